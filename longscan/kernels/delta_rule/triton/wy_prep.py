"""path="wy", stage 1: every chunk's WY representation, three kernels of one program per (chunk, sequence,
head): A (``_wy_kkt``), its inverse (``_wy_inverse``), W and U (``_wy_w_u``).

Chunks of BT = 64 tokens, split into four blocks of 16. With b the cumulative log gate inside the chunk
(zero without a gate; one a key for per-key gates), A_ts = β_t Σ_k k_tk k_sk exp(b_tk - b_sk) for s < t
(per-key decays through ``wy_decay``; with q, per-key gates' decayed scores (Q Kᵀ ⊙ D)_ts = Σ_k q_tk k_sk
exp(b_tk - b_sk), s ≤ t, from the same decay factors, written once for the output and dv_local kernels, which
would otherwise form them again for every block of V columns), and P = (I + A)⁻¹ by blocks: each 16×16
diagonal block inverted by forward substitution, then the blocks below joined by float32 products,
    P_ij = -P_ii Σ_{j ≤ m < i} A_im P_mj.
Then W = P X and U = P Y with X = Diag(β) (K ⊙ exp(b)) and Y = Diag(β) V. For per-key gates ``_wy_w_u``
also writes K̄ = K ⊙ exp(b_C - b), Q̃ = Q ⊙ exp(b) and exp(b_C) (b_C the chunk's total), which the serial
kernels read instead of forming them; ``_wy_kkt`` writes b (a scalar gate's `[B, H, N·BT]`, per-key gates'
`[B, H, N·BT, K]`, float32), which every later kernel reads instead of summing g again. P, W, U, K̄, Q̃ and
the decayed scores are written in the inputs' dtype (the operands of the tensor-core products that read
them); every product accumulates in float32. In every wy kernel a chunk's (or sequence's) token and row
bases are int64 (B·T·H·K passes 2³¹ at about 16M tokens × heads with K = 128), the offsets inside it int32.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from longscan.kernels.delta_rule.triton.common import gate_width, wy_chunk
from longscan.kernels.delta_rule.triton.wy_decay import (BT, NO_GATE, PER_KEY, SCALAR, decayed_scores,
                                                         decayed_scores_pair, gate_kind, refs)


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
def _wy_kkt(Q, K_, BETA, G, A_, QK, GB, T, H, N, K, GATE: tl.constexpr, WRITE_QK: tl.constexpr, BK: tl.constexpr,
            PREC: tl.constexpr):
    """A = strict(Diag(β) (K Kᵀ ⊙ D)) `[BT, BT]` float32, one `[BT, BT]` product over blocks of keys; the gate's
    cumulative sums b in the chunk to GB (a scalar gate's `[B, H, N·BT]`, per-key gates' `[B, H, N·BT, K]`, float32:
    every later kernel reads them from there); WRITE_QK (per-key gates with q): (Q Kᵀ ⊙ D) on and below the
    diagonal to QK `[B, H, N·BT, BT]` in k's dtype."""
    n, bh = tl.program_id(0), tl.program_id(1)
    oc, mt, tok0, tok, row0 = wy_chunk(n, bh, T, H, N)
    gk = gate_width(K, GATE)   # a gate a key: G, DB and DG hold K values a token
    BETA = BETA + tok0
    if GATE != NO_GATE:
        G = G + tok0 * gk
    K_ = K_ + tok0 * K
    if WRITE_QK:
        Q = Q + tok0 * K
    a = tl.zeros([BT, BT], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for ik in range(0, tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        m = mt[:, None] & (ok < K)[None, :]
        k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m, other=0.)
        if GATE == PER_KEY:
            bk = tl.cumsum(tl.load(G + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(tl.float32), axis=0)
            tl.store(GB + (row0 + oc[:, None]) * K + ok[None, :], bk, mask=(ok < K)[None, :])
            r0, r1, r2, r3 = refs(bk, oc)
            kf = k.to(tl.float32)
            if WRITE_QK:
                qf = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(k.dtype).to(tl.float32)
                a_ik, qk_ik = decayed_scores_pair(kf, qf, kf, bk, r0, r1, r2, r3, oc, k.dtype, PREC)
                a += a_ik
                qk += qk_ik
            else:
                a += decayed_scores(kf, kf, bk, r0, r1, r2, r3, oc, k.dtype, PREC)
        else:
            a += tl.dot(k, tl.trans(k), input_precision=PREC)
    strict = oc[:, None] > oc[None, :]
    if GATE == SCALAR:
        bc = tl.cumsum(tl.load(G + tok, mask=mt, other=0.).to(tl.float32), axis=0)
        tl.store(GB + row0 + oc, bc)
        a = a * tl.exp(tl.where(strict, bc[:, None] - bc[None, :], 0.))
    if WRITE_QK:
        dst = QK + (bh * N + n).to(tl.int64) * BT * BT + oc[:, None] * BT + oc[None, :]
        tl.store(dst, tl.where(oc[:, None] >= oc[None, :], qk, 0.).to(QK.dtype.element_ty))
    a = tl.where(strict, a * tl.load(BETA + tok, mask=mt, other=0.).to(tl.float32)[:, None], 0.)
    tl.store(A_ + (bh * N + n).to(tl.int64) * BT * BT + oc[:, None] * BT + oc[None, :], a)


@triton.jit
def _wy_inverse(A_, P_, N):
    """P = (I + A)⁻¹ by 16×16 blocks: the diagonal ones by forward substitution, the rest joined by
    float32 products. P's upper blocks are written as zeros."""
    n, bh = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, 16)
    o16 = r[:, None] * BT + r[None, :]
    src = A_ + (bh * N + n).to(tl.int64) * BT * BT + o16
    a00 = tl.load(src)
    a10 = tl.load(src + 16 * BT)
    a11 = tl.load(src + 16 * BT + 16)
    a20 = tl.load(src + 32 * BT)
    a21 = tl.load(src + 32 * BT + 16)
    a22 = tl.load(src + 32 * BT + 32)
    a30 = tl.load(src + 48 * BT)
    a31 = tl.load(src + 48 * BT + 16)
    a32 = tl.load(src + 48 * BT + 32)
    a33 = tl.load(src + 48 * BT + 48)
    p00, p11, p22, p33 = _inv16(a00, r), _inv16(a11, r), _inv16(a22, r), _inv16(a33, r)
    p10 = -_dot32(p11, _dot32(a10, p00))
    p21 = -_dot32(p22, _dot32(a21, p11))
    p32 = -_dot32(p33, _dot32(a32, p22))
    p20 = -_dot32(p22, _dot32(a20, p00) + _dot32(a21, p10))
    p31 = -_dot32(p33, _dot32(a31, p11) + _dot32(a32, p21))
    p30 = -_dot32(p33, _dot32(a30, p00) + _dot32(a31, p10) + _dot32(a32, p20))
    dt = P_.dtype.element_ty
    dst = P_ + (bh * N + n).to(tl.int64) * BT * BT + o16
    tl.store(dst, p00.to(dt))
    tl.store(dst + 16 * BT, p10.to(dt))
    tl.store(dst + 16 * BT + 16, p11.to(dt))
    tl.store(dst + 32 * BT, p20.to(dt))
    tl.store(dst + 32 * BT + 16, p21.to(dt))
    tl.store(dst + 32 * BT + 32, p22.to(dt))
    tl.store(dst + 48 * BT, p30.to(dt))
    tl.store(dst + 48 * BT + 16, p31.to(dt))
    tl.store(dst + 48 * BT + 32, p32.to(dt))
    tl.store(dst + 48 * BT + 48, p33.to(dt))
    z = tl.zeros([16, 16], dtype=dt)
    tl.store(dst + 16, z)
    tl.store(dst + 32, z)
    tl.store(dst + 48, z)
    tl.store(dst + 16 * BT + 32, z)
    tl.store(dst + 16 * BT + 48, z)
    tl.store(dst + 32 * BT + 48, z)


@triton.jit
def _wy_w_u(Q, K_, V_, BETA, G, P_, W, U, KB, QG, GC, T, H, N, K, V, GATE: tl.constexpr, HAS_Q: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """W = P X, X = Diag(β) (K ⊙ exp(b)), and U = P Y, Y = Diag(β) V, `[BT, BT]` products; per-key gates
    also K̄, exp(b_C) and (with q) Q̃. G: b as ``_wy_kkt`` wrote it (GB)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    oc, mt, tok0, tok, row0 = wy_chunk(n, bh, T, H, N)
    row = oc
    P_ = P_ + row0 * BT
    W = W + row0 * K
    if GATE == PER_KEY:
        KB, GC = KB + row0 * K, GC + (bh * N + n).to(tl.int64) * K
        if HAS_Q:
            QG = QG + row0 * K
    U = U + row0 * V
    BETA = BETA + tok0
    if GATE == PER_KEY:   # b `[B, H, N·BT, K]`, as ``_wy_kkt`` wrote it
        G = G + row0 * K
    if GATE == SCALAR:
        G = G + row0
    K_ = K_ + tok0 * K
    if HAS_Q:
        Q = Q + tok0 * K
    V_ = V_ + tok0 * V
    dt = P_.dtype.element_ty
    p = tl.load(P_ + row[:, None] * BT + oc[None, :])
    beta = tl.load(BETA + tok, mask=mt, other=0.).to(tl.float32)
    ex = beta
    if GATE == SCALAR:
        ex = beta * tl.exp(tl.load(G + row))
    for ik in range(0, tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        mk = ok < K
        m = mt[:, None] & mk[None, :]
        x = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m, other=0.)
        if GATE == PER_KEY:
            bk = tl.load(G + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
            last = tl.load(G + (BT - 1) * K + ok, mask=mk, other=0.)
            xf = x.to(tl.float32)
            w = tl.dot(p, (xf * tl.exp(bk) * beta[:, None]).to(dt), input_precision=PREC)
            tl.store(KB + row[:, None] * K + ok[None, :], (xf * tl.exp(last[None, :] - bk)).to(dt),
                     mask=mk[None, :])
            if HAS_Q:
                q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(tl.float32)
                tl.store(QG + row[:, None] * K + ok[None, :], (q * tl.exp(bk)).to(dt), mask=mk[None, :])
            tl.store(GC + ok, tl.exp(last), mask=mk)
        else:
            w = tl.dot(p, (x * ex[:, None]).to(dt), input_precision=PREC)
        tl.store(W + row[:, None] * K + ok[None, :], w.to(dt), mask=mk[None, :])
    for iv in range(0, tl.cdiv(V, BV)):
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        y = tl.load(V_ + tok[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.)
        u = tl.dot(p, (y * beta[:, None]).to(dt), input_precision=PREC)
        tl.store(U + row[:, None] * V + ov[None, :], u.to(dt), mask=mv[None, :])


class Prepared(NamedTuple):
    """What ``wy_prepare`` forms once a chunk, in k's dtype unless named: P `[B, H, N·BT, BT]`, W `[B, H, N·BT, K]`,
    U `[B, H, N·BT, V]`; for per-key gates K̄ `[B, H, N·BT, K]`, exp(b_C) `[B, H, N, K]` float32 and, with q, Q̃
    `[B, H, N·BT, K]` and the decayed scores QK `[B, H, N·BT, BT]` (zero above the diagonal), else None; and gate:
    what every later kernel reads as the gate, the cumulative sums b in each chunk (a scalar gate's `[B, H, N·BT]`,
    per-key gates' `[B, H, N·BT, K]`, float32), or None."""
    P: torch.Tensor
    W: torch.Tensor
    U: torch.Tensor
    KB: Optional[torch.Tensor]
    QG: Optional[torch.Tensor]
    GC: Optional[torch.Tensor]
    QK: Optional[torch.Tensor]
    gate: Optional[torch.Tensor]


def wy_prepare(q, k, v, beta, g, *, block_k: int, block_v: int, num_warps: int, precision: str,
               inverse_warps: int) -> Prepared:
    """Every chunk's WY representation and what the later stages read of it (``Prepared``)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = triton.cdiv(T, 64)
    A = torch.empty(B, H, N * 64, 64, device=k.device, dtype=torch.float32)
    P = torch.empty(B, H, N * 64, 64, device=k.device, dtype=k.dtype)
    W = torch.empty(B, H, N * 64, K, device=k.device, dtype=k.dtype)
    U = torch.empty(B, H, N * 64, V, device=k.device, dtype=k.dtype)
    gate = gate_kind(g)
    KB = QG = GC = QK = None
    if gate == PER_KEY:
        KB = torch.empty_like(W)
        GC = torch.empty(B, H, N, K, device=k.device, dtype=torch.float32)
        if q is not None:
            QG = torch.empty_like(W)
            QK = torch.empty_like(P)
    # the gate's cumulative sums in each chunk, formed once (by ``_wy_kkt``) for every later kernel
    GB = (torch.empty(B, H, N * 64, device=k.device, dtype=torch.float32) if gate == SCALAR else
          torch.empty(B, H, N * 64, K, device=k.device, dtype=torch.float32) if gate == PER_KEY else None)
    _wy_kkt[(N, B * H)](q, k, beta, g, A, QK, GB, T, H, N, K, GATE=gate, WRITE_QK=QK is not None,
                        BK=block_k, PREC=precision, num_warps=num_warps)
    gate_in = GB
    _wy_inverse[(N, B * H)](A, P, N, num_warps=inverse_warps)
    _wy_w_u[(N, B * H)](q, k, v, beta, gate_in, P, W, U, KB, QG, GC, T, H, N, K, V, GATE=gate,
                        HAS_Q=q is not None, BK=block_k, BV=block_v, PREC=precision, num_warps=num_warps)
    return Prepared(P, W, U, KB, QG, GC, QK, gate_in)
