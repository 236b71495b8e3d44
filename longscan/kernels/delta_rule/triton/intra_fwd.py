"""The chunks' own quantities (the WY / UT representation), forward: one program per (chunk, sequence, head).

Inside a chunk of C tokens, with b_t the chunk-local cumulative log gate (zero without a gate, one value a
token for a scalar gate, one a token and key for a per-key gate: then D and exp(b) act key by key) and
D_ts = exp(b_t - b_s) for s ≤ t (zero above):
    A   = strictly lower part of Diag(β) (K Kᵀ ⊙ D)            P = (I + A)⁻¹   (unit lower triangular)
    W   = P Diag(β) Diag(exp(b)) K                              U_0 = P Diag(β) V
    QK  = lower part (diagonal included) of Q Kᵀ ⊙ D            Q̃ = Diag(exp(b)) Q
    K̄  = Diag(exp(b_C - b)) K                                  l = b_C (the chunk's total log gate)
P comes from forward substitution row by row in registers, row i = e_i - Σ_{s<i} A_is P_s: each row needs the
rows above it, and substitution on a unit lower-triangular matrix needs no pivoting. options.inverse="blocks"
solves the two diagonal half-blocks side by side (half the sequential steps) and joins them with two
products (``_solve_unit_lower_blocks``).
Every exponent is a difference b_t - b_s with s ≤ t (≤ 0), so steep gates stay finite. P is written for the
backward (`[C, C]` a chunk, the size of QK, cheaper to keep than to solve again).

The tokens are read where they lie (`[B, T, H, ...]`), the last chunk masked past T; the outputs are
`[B, H, N, C, ...]` float32, rows past T zero (their k, v, β are read as zero), as the recurrence across
chunks reads them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longscan.kernels.delta_rule.triton.common import float32_chunk, float32_grams
from longscan.kernels.delta_rule.triton.inter import Chunks, pow2


@triton.jit
def _solve_unit_lower(A, C, BC: tl.constexpr):
    """(I + A)⁻¹ for A strictly lower `[BC, BC]` (rows and columns from C on are zero: identity there)."""
    oc = tl.arange(0, BC)
    P = tl.where(oc[:, None] == oc[None, :], 1., 0.)
    for i in range(1, C):
        a = tl.sum(tl.where(oc[:, None] == i, A, 0.), axis=0)          # row i of A, by column s
        row = tl.where(oc == i, 1., 0.) - tl.sum(a[:, None] * P, axis=0)
        P = tl.where(oc[:, None] == i, row[None, :], P)
    return P


@triton.jit
def _solve_unit_lower_blocks(A, BC: tl.constexpr):
    """(I + A)⁻¹ as the rows' loop does, in half the sequential steps: the two diagonal blocks of BC / 2 are
    solved side by side (rows i and i + BC / 2 a step), then the off-diagonal block joins them in two float32
    products. With I + A = L_d (I + N), L_d its block diagonal and N = L_d⁻¹ A_21 (N² = 0):
    (I + A)⁻¹ = L_d⁻¹ - L_d⁻¹ A_21 L_d⁻¹."""
    HB: tl.constexpr = BC // 2
    oc = tl.arange(0, BC)
    blk = oc // HB
    Ad = tl.where(blk[:, None] == blk[None, :], A, 0.)
    P = tl.where(oc[:, None] == oc[None, :], 1., 0.)
    for i in range(1, HB):
        a1 = tl.sum(tl.where(oc[:, None] == i, Ad, 0.), axis=0)
        a2 = tl.sum(tl.where(oc[:, None] == i + HB, Ad, 0.), axis=0)
        r1 = tl.where(oc == i, 1., 0.) - tl.sum(a1[:, None] * P, axis=0)
        r2 = tl.where(oc == i + HB, 1., 0.) - tl.sum(a2[:, None] * P, axis=0)
        P = tl.where(oc[:, None] == i, r1[None, :], tl.where(oc[:, None] == i + HB, r2[None, :], P))
    off = tl.where(blk[:, None] > blk[None, :], A, 0.)
    return P - tl.dot(tl.dot(P, off, input_precision="ieee"), P, input_precision="ieee")


@triton.jit
def _intra_fwd(Q, K_, V_, BETA, G, W, U0, QK, QT, KB, LAST, P_, T, H, N, C, K, V,
               HAS_Q: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               PREC: tl.constexpr, BLOCKED: tl.constexpr):
    """GATE: 0 none, 1 scalar (G `[B, T, H]`, LAST `[BH, N]`). BK keys at a time: K Kᵀ and Q Kᵀ summed over
    the blocks of keys, then P, then each block of keys' W, Q̃ and K̄ (no `[C, K]` tile held whole)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    oc, mc, mt, tok, row = float32_chunk(n, bh, T, H, N, C, BC)
    m_cc = mc[:, None] & mc[None, :]
    beta = tl.load(BETA + tok, mask=mt, other=0.).to(tl.float32)
    causal = oc[:, None] >= oc[None, :]
    kk, qk = float32_grams(Q, K_, tok, mt, K, HAS_Q, BC, BK, PREC)
    eb = tl.full([BC], 1., tl.float32)
    ekb = eb
    if GATE == 1:
        bc = tl.cumsum(tl.load(G + tok, mask=mt, other=0.).to(tl.float32), axis=0)
        last = tl.sum(tl.where(oc == C - 1, bc, 0.), axis=0)
        D = tl.where(causal, tl.exp(tl.where(causal, bc[:, None] - bc[None, :], 0.)), 0.)
        kk = kk * D
        qk = qk * D
        eb = tl.exp(bc)
        ekb = tl.exp(last - bc)
        tl.store(LAST + row, last)
    if HAS_Q:
        tl.store(QK + row * C * C + oc[:, None] * C + oc[None, :], tl.where(causal, qk, 0.), mask=m_cc)
    A = tl.where(oc[:, None] > oc[None, :], beta[:, None] * kk, 0.)
    if BLOCKED:
        P = _solve_unit_lower_blocks(A, BC)
    else:
        P = _solve_unit_lower(A, C, BC)
    tl.store(P_ + row * C * C + oc[:, None] * C + oc[None, :], P, mask=m_cc)
    for ik in range(0, tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        mk = ok < K
        m_tk = mt[:, None] & mk[None, :]
        m_ck = mc[:, None] & mk[None, :]
        o_ck = row * C * K + oc[:, None] * K + ok[None, :]
        k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(tl.float32)
        tl.store(W + o_ck, tl.dot(P, (beta * eb)[:, None] * k, input_precision=PREC), mask=m_ck)
        tl.store(KB + o_ck, k * ekb[:, None], mask=m_ck)
        if HAS_Q:
            q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(tl.float32)
            tl.store(QT + o_ck, q * eb[:, None], mask=m_ck)
    for iv in range(0, tl.cdiv(V, BV)):
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        v = tl.load(V_ + tok[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.).to(tl.float32)
        u = tl.dot(P, beta[:, None] * v, input_precision=PREC)
        tl.store(U0 + row * C * V + oc[:, None] * V + ov[None, :], u, mask=mc[:, None] & mv[None, :])


@triton.jit
def _intra_fwd_per_key(Q, K_, V_, BETA, G, W, U0, QK, QT, KB, LAST, P_, T, H, N, C, K, V,
                       HAS_Q: tl.constexpr, BC: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
                       PREC: tl.constexpr, BLOCKED: tl.constexpr):
    """Per-key gates (G `[B, T, H, K]`, LAST `[BH, N, K]`): the decays differ by key, so K Kᵀ ⊙ D and Q Kᵀ ⊙ D
    are sums over blocks of BKS keys of `[C, C, BKS]` products, each exp(b_tk - b_sk) formed exactly (s ≤ t)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    oc, mc, mt, tok, row = float32_chunk(n, bh, T, H, N, C, BC)
    causal = oc[:, None] >= oc[None, :]
    beta = tl.load(BETA + tok, mask=mt, other=0.).to(tl.float32)
    kk = tl.zeros([BC, BC], dtype=tl.float32)
    qk = tl.zeros([BC, BC], dtype=tl.float32)
    for ib in range(0, tl.cdiv(K, BKS)):
        ok = ib * BKS + tl.arange(0, BKS)
        m = mt[:, None] & (ok < K)[None, :]
        k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(tl.float32)
        bc = tl.cumsum(tl.load(G + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(tl.float32), axis=0)
        d = bc[:, None, :] - bc[None, :, :]                                  # [C(t), C(s), BKS]
        e = tl.where(causal[:, :, None], tl.exp(tl.where(causal[:, :, None], d, 0.)), 0.)
        kk += tl.sum(k[:, None, :] * k[None, :, :] * e, axis=2)
        if HAS_Q:
            q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(tl.float32)
            qk += tl.sum(q[:, None, :] * k[None, :, :] * e, axis=2)
    A = tl.where(oc[:, None] > oc[None, :], beta[:, None] * kk, 0.)
    if BLOCKED:
        P = _solve_unit_lower_blocks(A, BC)
    else:
        P = _solve_unit_lower(A, C, BC)
    m_cc = mc[:, None] & mc[None, :]
    tl.store(P_ + row * C * C + oc[:, None] * C + oc[None, :], P, mask=m_cc)
    if HAS_Q:
        tl.store(QK + row * C * C + oc[:, None] * C + oc[None, :], qk, mask=m_cc)
    for ib in range(0, tl.cdiv(K, BKS)):
        ok = ib * BKS + tl.arange(0, BKS)
        mk = ok < K
        m = mt[:, None] & mk[None, :]
        m_ck = mc[:, None] & mk[None, :]
        k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(tl.float32)
        bc = tl.cumsum(tl.load(G + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(tl.float32), axis=0)
        last = tl.sum(tl.where(oc[:, None] == C - 1, bc, 0.), axis=0)     # [BKS]
        tl.store(LAST + row * K + ok, last, mask=mk)
        tl.store(W + row * C * K + oc[:, None] * K + ok[None, :],
                 tl.dot(P, beta[:, None] * tl.exp(bc) * k, input_precision=PREC), mask=m_ck)
        tl.store(KB + row * C * K + oc[:, None] * K + ok[None, :], k * tl.exp(last[None, :] - bc), mask=m_ck)
        if HAS_Q:
            q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(tl.float32)
            tl.store(QT + row * C * K + oc[:, None] * K + ok[None, :], q * tl.exp(bc), mask=m_ck)
    for iv in range(0, tl.cdiv(V, BV)):
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        v = tl.load(V_ + tok[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.).to(tl.float32)
        u = tl.dot(P, beta[:, None] * v, input_precision=PREC)
        tl.store(U0 + row * C * V + oc[:, None] * V + ov[None, :], u, mask=mc[:, None] & mv[None, :])


def intra_forward(*, q, k, v, beta, g, chunk: int, block_v: int, block_k: int, num_warps: int,
                  num_stages: int, precision: str, inverse: str):
    """q (or None), k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]`, g None, `[B, T, H]` or `[B, T, H, K]` ->
    (Chunks of float32 `[B, H, N, ...]`, P `[B, H, N, C, C]`) with C = min(chunk, T)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = min(chunk, T)
    N = triton.cdiv(T, C)
    new = lambda *s: torch.empty(B, H, N, *s, device=k.device, dtype=torch.float32)  # noqa: E731
    has_q = q is not None
    W, U0, KB, P = new(C, K), new(C, V), new(C, K), new(C, C)
    QK, QT = (new(C, C), new(C, K)) if has_q else (None, None)
    per_key = g is not None and g.dim() == 4
    last = new(K if per_key else 1) if g is not None else None
    args = (q.contiguous() if has_q else None, k.contiguous(), v.contiguous(), beta.contiguous(),
            g.contiguous() if g is not None else None, W, U0, QK, QT, KB, last, P, T, H, N, C, K, V)
    if per_key:
        _intra_fwd_per_key[(N, B * H)](*args, HAS_Q=has_q, BC=pow2(C), BKS=block_k, BV=min(block_v, pow2(V)),
                                       PREC=precision, BLOCKED=inverse == "blocks", num_warps=num_warps,
                                       num_stages=num_stages)
    else:
        _intra_fwd[(N, B * H)](*args, HAS_Q=has_q, GATE=int(g is not None), BC=pow2(C), BK=min(block_k, pow2(K)),
                               BV=min(block_v, pow2(V)), PREC=precision, BLOCKED=inverse == "blocks",
                               num_warps=num_warps, num_stages=num_stages)
    return Chunks(W, U0, QK, QT, KB, last), P
