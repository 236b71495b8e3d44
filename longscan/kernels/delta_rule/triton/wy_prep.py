"""path="wy", stage 1: every chunk's WY representation, one program per (chunk, sequence, head).

Chunks of BT = 64 tokens, split into four blocks of 16. With b the cumulative log gate inside the chunk
(zero without a gate), A_ts = β_t (k_t·k_s) exp(b_t - b_s) for s < t, and P = (I + A)⁻¹ by blocks: each
16×16 diagonal block inverted by forward substitution, then the blocks below joined by float32 products,
    P_ij = -P_ii Σ_{j ≤ m < i} A_im P_mj.
Then W = P X and U = P Y with X = Diag(β exp(b)) K and Y = Diag(β) V. P, W and U are written in the
inputs' dtype (the operands of the tensor-core products that read them); every product accumulates in
float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BT: tl.constexpr = tl.constexpr(64)   # tokens a chunk: four diagonal blocks of 16 (tl.dot's smallest tile)


@triton.jit
def _inv16(A, r):
    """(I + A)⁻¹ of a strictly lower [16, 16] float32 block, by forward substitution: row i = e_i - Σ_s A_is P_s."""
    P = tl.where(r[:, None] == r[None, :], 1., 0.)
    for i in range(1, 16):
        a = tl.sum(tl.where(r[:, None] == i, A, 0.), axis=0)
        row = tl.where(r == i, 1., 0.) - tl.sum(a[:, None] * P, axis=0)
        P = tl.where(r[:, None] == i, row[None, :], P)
    return P


@triton.jit
def _dot32(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _gate_block(G, tok, m, base):
    """The cumulative log gate of one block of 16 tokens, continuing from ``base`` -> (b [16], its last value)."""
    g = tl.load(G + tok, mask=m, other=0.).to(tl.float32)
    return base + tl.cumsum(g, axis=0), base + tl.sum(g, axis=0)


@triton.jit
def _scaled_a(a, beta_i, b_i, b_j, r, GATE: tl.constexpr, DIAG: tl.constexpr):
    """β_i (K_i K_jᵀ) exp(b_i - b_j), strictly lower on a diagonal block."""
    if GATE:
        a = a * tl.exp(b_i[:, None] - b_j[None, :])
    a = a * beta_i[:, None]
    if DIAG:
        a = tl.where(r[:, None] > r[None, :], a, 0.)
    return a


@triton.jit
def _lower_times(P00, P10, P11, P20, P21, P22, P30, P31, P32, P33, x0, x1, x2, x3, PREC: tl.constexpr):
    """The four row blocks of P X for a block-lower P (operands in X's dtype, float32 sums)."""
    dt = x0.dtype
    y0 = tl.dot(P00.to(dt), x0, input_precision=PREC)
    y1 = tl.dot(P10.to(dt), x0, input_precision=PREC) + tl.dot(P11.to(dt), x1, input_precision=PREC)
    y2 = (tl.dot(P20.to(dt), x0, input_precision=PREC) + tl.dot(P21.to(dt), x1, input_precision=PREC)
          + tl.dot(P22.to(dt), x2, input_precision=PREC))
    y3 = (tl.dot(P30.to(dt), x0, input_precision=PREC) + tl.dot(P31.to(dt), x1, input_precision=PREC)
          + tl.dot(P32.to(dt), x2, input_precision=PREC) + tl.dot(P33.to(dt), x3, input_precision=PREC))
    return y0, y1, y2, y3


@triton.jit
def _wy_prep(K_, V_, BETA, G, P_, W, U, T, H, N, K, V, GATE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             PREC: tl.constexpr):
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    r = tl.arange(0, 16)
    t0, t1, t2, t3 = n * BT + r, n * BT + 16 + r, n * BT + 32 + r, n * BT + 48 + r
    m0, m1, m2, m3 = t0 < T, t1 < T, t2 < T, t3 < T
    tok0, tok1, tok2, tok3 = (b * T + t0) * H + h, (b * T + t1) * H + h, (b * T + t2) * H + h, (b * T + t3) * H + h
    beta0 = tl.load(BETA + tok0, mask=m0, other=0.).to(tl.float32)
    beta1 = tl.load(BETA + tok1, mask=m1, other=0.).to(tl.float32)
    beta2 = tl.load(BETA + tok2, mask=m2, other=0.).to(tl.float32)
    beta3 = tl.load(BETA + tok3, mask=m3, other=0.).to(tl.float32)
    zero = tl.zeros([16], dtype=tl.float32)
    b0, b1, b2, b3 = zero, zero, zero, zero
    if GATE:
        b0, s0 = _gate_block(G, tok0, m0, 0.)
        b1, s1 = _gate_block(G, tok1, m1, s0)
        b2, s2 = _gate_block(G, tok2, m2, s1)
        b3, s3 = _gate_block(G, tok3, m3, s2)
    # K Kᵀ by blocks of 16 tokens (the ten on or below the diagonal), summed over blocks of keys
    z = tl.zeros([16, 16], dtype=tl.float32)
    a00, a10, a11, a20, a21, a22, a30, a31, a32, a33 = z, z, z, z, z, z, z, z, z, z
    for ik in range(0, tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        mk = (ok < K)[None, :]
        k0 = tl.load(K_ + tok0[:, None] * K + ok[None, :], mask=m0[:, None] & mk, other=0.)
        k1 = tl.load(K_ + tok1[:, None] * K + ok[None, :], mask=m1[:, None] & mk, other=0.)
        k2 = tl.load(K_ + tok2[:, None] * K + ok[None, :], mask=m2[:, None] & mk, other=0.)
        k3 = tl.load(K_ + tok3[:, None] * K + ok[None, :], mask=m3[:, None] & mk, other=0.)
        a00 += tl.dot(k0, tl.trans(k0), input_precision=PREC)
        a10 += tl.dot(k1, tl.trans(k0), input_precision=PREC)
        a11 += tl.dot(k1, tl.trans(k1), input_precision=PREC)
        a20 += tl.dot(k2, tl.trans(k0), input_precision=PREC)
        a21 += tl.dot(k2, tl.trans(k1), input_precision=PREC)
        a22 += tl.dot(k2, tl.trans(k2), input_precision=PREC)
        a30 += tl.dot(k3, tl.trans(k0), input_precision=PREC)
        a31 += tl.dot(k3, tl.trans(k1), input_precision=PREC)
        a32 += tl.dot(k3, tl.trans(k2), input_precision=PREC)
        a33 += tl.dot(k3, tl.trans(k3), input_precision=PREC)
    a00 = _scaled_a(a00, beta0, b0, b0, r, GATE, True)
    a11 = _scaled_a(a11, beta1, b1, b1, r, GATE, True)
    a22 = _scaled_a(a22, beta2, b2, b2, r, GATE, True)
    a33 = _scaled_a(a33, beta3, b3, b3, r, GATE, True)
    a10 = _scaled_a(a10, beta1, b1, b0, r, GATE, False)
    a20 = _scaled_a(a20, beta2, b2, b0, r, GATE, False)
    a21 = _scaled_a(a21, beta2, b2, b1, r, GATE, False)
    a30 = _scaled_a(a30, beta3, b3, b0, r, GATE, False)
    a31 = _scaled_a(a31, beta3, b3, b1, r, GATE, False)
    a32 = _scaled_a(a32, beta3, b3, b2, r, GATE, False)
    p00, p11, p22, p33 = _inv16(a00, r), _inv16(a11, r), _inv16(a22, r), _inv16(a33, r)
    p10 = -_dot32(p11, _dot32(a10, p00))
    p21 = -_dot32(p22, _dot32(a21, p11))
    p32 = -_dot32(p33, _dot32(a32, p22))
    p20 = -_dot32(p22, _dot32(a20, p00) + _dot32(a21, p10))
    p31 = -_dot32(p33, _dot32(a31, p11) + _dot32(a32, p21))
    p30 = -_dot32(p33, _dot32(a30, p00) + _dot32(a31, p10) + _dot32(a32, p20))
    # P `[BT, BT]` a chunk, zero above the diagonal blocks
    dt = P_.dtype.element_ty
    base = P_ + (bh * N + n) * BT * BT
    o16 = r[:, None] * BT + r[None, :]
    tl.store(base + o16, p00.to(dt))
    tl.store(base + 16 * BT + o16, p10.to(dt))
    tl.store(base + 16 * BT + 16 + o16, p11.to(dt))
    tl.store(base + 32 * BT + o16, p20.to(dt))
    tl.store(base + 32 * BT + 16 + o16, p21.to(dt))
    tl.store(base + 32 * BT + 32 + o16, p22.to(dt))
    tl.store(base + 48 * BT + o16, p30.to(dt))
    tl.store(base + 48 * BT + 16 + o16, p31.to(dt))
    tl.store(base + 48 * BT + 32 + o16, p32.to(dt))
    tl.store(base + 48 * BT + 48 + o16, p33.to(dt))
    zt = z.to(dt)
    tl.store(base + 16 + o16, zt)
    tl.store(base + 32 + o16, zt)
    tl.store(base + 48 + o16, zt)
    tl.store(base + 16 * BT + 32 + o16, zt)
    tl.store(base + 16 * BT + 48 + o16, zt)
    tl.store(base + 32 * BT + 48 + o16, zt)
    row = (bh * N + n) * BT
    # W = P X, X = Diag(β exp(b)) K
    e0, e1, e2, e3 = beta0 * tl.exp(b0), beta1 * tl.exp(b1), beta2 * tl.exp(b2), beta3 * tl.exp(b3)
    for ik in range(0, tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        mk = (ok < K)[None, :]
        x0 = (tl.load(K_ + tok0[:, None] * K + ok[None, :], mask=m0[:, None] & mk, other=0.) * e0[:, None]).to(dt)
        x1 = (tl.load(K_ + tok1[:, None] * K + ok[None, :], mask=m1[:, None] & mk, other=0.) * e1[:, None]).to(dt)
        x2 = (tl.load(K_ + tok2[:, None] * K + ok[None, :], mask=m2[:, None] & mk, other=0.) * e2[:, None]).to(dt)
        x3 = (tl.load(K_ + tok3[:, None] * K + ok[None, :], mask=m3[:, None] & mk, other=0.) * e3[:, None]).to(dt)
        w0, w1, w2, w3 = _lower_times(p00, p10, p11, p20, p21, p22, p30, p31, p32, p33, x0, x1, x2, x3, PREC)
        tl.store(W + (row + r[:, None]) * K + ok[None, :], w0.to(dt), mask=mk)
        tl.store(W + (row + 16 + r[:, None]) * K + ok[None, :], w1.to(dt), mask=mk)
        tl.store(W + (row + 32 + r[:, None]) * K + ok[None, :], w2.to(dt), mask=mk)
        tl.store(W + (row + 48 + r[:, None]) * K + ok[None, :], w3.to(dt), mask=mk)
    # U = P Y, Y = Diag(β) V
    for iv in range(0, tl.cdiv(V, BV)):
        ov = iv * BV + tl.arange(0, BV)
        mv = (ov < V)[None, :]
        y0 = (tl.load(V_ + tok0[:, None] * V + ov[None, :], mask=m0[:, None] & mv, other=0.) * beta0[:, None]).to(dt)
        y1 = (tl.load(V_ + tok1[:, None] * V + ov[None, :], mask=m1[:, None] & mv, other=0.) * beta1[:, None]).to(dt)
        y2 = (tl.load(V_ + tok2[:, None] * V + ov[None, :], mask=m2[:, None] & mv, other=0.) * beta2[:, None]).to(dt)
        y3 = (tl.load(V_ + tok3[:, None] * V + ov[None, :], mask=m3[:, None] & mv, other=0.) * beta3[:, None]).to(dt)
        u0, u1, u2, u3 = _lower_times(p00, p10, p11, p20, p21, p22, p30, p31, p32, p33, y0, y1, y2, y3, PREC)
        tl.store(U + (row + r[:, None]) * V + ov[None, :], u0.to(dt), mask=mv)
        tl.store(U + (row + 16 + r[:, None]) * V + ov[None, :], u1.to(dt), mask=mv)
        tl.store(U + (row + 32 + r[:, None]) * V + ov[None, :], u2.to(dt), mask=mv)
        tl.store(U + (row + 48 + r[:, None]) * V + ov[None, :], u3.to(dt), mask=mv)


def wy_prepare(k, v, beta, g, *, block_k: int, block_v: int, num_warps: int, precision: str):
    """-> (P `[B, H, N·BT, BT]`, W `[B, H, N·BT, K]`, U `[B, H, N·BT, V]`), all in k's dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = triton.cdiv(T, 64)
    P = torch.empty(B, H, N * 64, 64, device=k.device, dtype=k.dtype)
    W = torch.empty(B, H, N * 64, K, device=k.device, dtype=k.dtype)
    U = torch.empty(B, H, N * 64, V, device=k.device, dtype=k.dtype)
    _wy_prep[(N, B * H)](k, v.to(k.dtype), beta, g, P, W, U, T, H, N, K, V, GATE=g is not None, BK=block_k,
                         BV=block_v, PREC=precision, num_warps=num_warps)
    return P, W, U
