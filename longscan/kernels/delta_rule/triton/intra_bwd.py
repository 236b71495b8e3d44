"""The chunks' own quantities, backward: one program per (chunk, sequence, head).

To the gradients of q, k, v, β and g, from the recurrence's dU_0 and the gradients of the states leaving the
chunks (``inter_backward_states``): the sums over V of the recurrence's gradients (dW = -dU S_nᵀ,
dQ̃ = scale do S_nᵀ, dK̄ = U dS_{n+1}ᵀ, dQK = scale do Uᵀ, dl = exp(l) Σ_v S_n ⊙ dS_{n+1}) are formed here, a
block of V at a time, from the states entering the chunks and U, so no per-V-block shares of them are
written. With X = Diag(β exp(b)) K and Y = Diag(β) V (W = P X, U_0 = P Y):
    dX = Pᵀ dW,   dY = Pᵀ dU_0,   dA = -(dX Wᵀ + dY U_0ᵀ) = -dY Uᵀ   (strictly lower; P = (I + A)⁻¹)
    dv = β dY,   dβ = Σ_v dY v + Σ_k dX exp(b) k + Σ_s (dA ⊙ D ⊙ K Kᵀ)
    dk = M K + Mᵀ K + β exp(b) dX + (dQK ⊙ D)ᵀ Q + exp(b_C - b) dK̄,   M = Diag(β) (dA ⊙ D)
    dq = (dQK ⊙ D) K + exp(b) dQ̃
and for a scalar gate the gradient of b: every factor exp(b_t - b_s) of a product F_ts gives
rowsum(dF ⊙ F) - colsum(dF ⊙ F); exp(b) of X and Q̃ gives Σ_k dX ⊙ X, Σ_k dQ̃ ⊙ Q̃; exp(b_C - b) of K̄ gives
-Σ_k dK̄ ⊙ K̄ to b and its total to b_C; dl goes to b_C. b = cumsum(g) in the chunk and b_C = Σ g, so
dg_t = Σ_{t' ≥ t} db_t' + d b_C. dA needs no keys: dW = -dU S_nᵀ makes dX Wᵀ = -dY (W S_n)ᵀ and
U = U_0 - W S_n, so dA is a sum over V alone, taken before any block of keys; each block of keys then
takes its own sums over V and writes its dk and dq, and no `[C, K]` tile is held whole. D and K Kᵀ are
recomputed from k and g; P and U are read (W and U_0 are not).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longscan.kernels.delta_rule.triton.common import float32_chunk, float32_grams
from longscan.kernels.delta_rule.triton.inter import Chunks, StateGrads, pow2

# keys a step of the per-key backward's `[C, C, keys]` decay products: at 8 Triton 3.6's ieee build spills
KS: tl.constexpr = tl.constexpr(4)


@triton.jit
def _intra_bwd(Q, K_, V_, BETA, G, P_, W, U0, UN, SN, DSN, DO, DU0, DQ, DK, DV, DBETA, DG, T, H, N, C, K, V, scale,
               HAS_Q: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               PREC: tl.constexpr):
    """No gate or a scalar one, BK keys at a time. First the blocks of V alone: dY, dv, dA = -dY Uᵀ and
    dQK = scale do Uᵀ; then each block of keys takes its sums over V (dW = -dU S_nᵀ, dQ̃ = scale do S_nᵀ,
    dK̄ = U dS_{n+1}ᵀ, Σ S_n ⊙ dS_{n+1}) and writes its dk and dq. K Kᵀ and Q Kᵀ, summed over the blocks of
    keys, give dβ's and db's terms after the last block. W is not read (dA needs no dX Wᵀ: see the module)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    oc, mc, mt, tok, row = float32_chunk(n, bh, T, H, N, C, BC)
    m_cc = mc[:, None] & mc[None, :]
    causal = oc[:, None] >= oc[None, :]
    strict = oc[:, None] > oc[None, :]
    beta = tl.load(BETA + tok, mask=mt, other=0.).to(tl.float32)
    P = tl.load(P_ + row * C * C + oc[:, None] * C + oc[None, :], mask=m_cc, other=0.)
    dA = tl.zeros([BC, BC], dtype=tl.float32)
    dqk = tl.zeros([BC, BC], dtype=tl.float32)
    dbeta = tl.zeros([BC], dtype=tl.float32)
    for iv in range(0, tl.cdiv(V, BV)):
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        m_cv = mc[:, None] & mv[None, :]
        o_cv = row * C * V + oc[:, None] * V + ov[None, :]
        u = tl.load(UN + o_cv, mask=m_cv, other=0.)
        dy = tl.dot(tl.trans(P), tl.load(DU0 + o_cv, mask=m_cv, other=0.), input_precision=PREC)
        dA -= tl.dot(dy, tl.trans(u), input_precision=PREC)
        if HAS_Q:
            do = tl.load(DO + o_cv, mask=m_cv, other=0.).to(tl.float32)
            dqk += tl.dot(do, tl.trans(u), input_precision=PREC)
        v = tl.load(V_ + tok[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.).to(tl.float32)
        dbeta += tl.sum(dy * v, axis=1)
        tl.store(DV + tok[:, None] * V + ov[None, :], beta[:, None] * dy, mask=mt[:, None] & mv[None, :])
    dA = tl.where(strict, dA, 0.)
    dqk = tl.where(causal, scale * dqk, 0.)
    M = dA * beta[:, None]
    dqkd = dqk
    eb = tl.full([BC], 1., tl.float32)
    ekb = eb
    if GATE == 1:
        bc = tl.cumsum(tl.load(G + tok, mask=mt, other=0.).to(tl.float32), axis=0)
        last = tl.sum(tl.where(oc == C - 1, bc, 0.), axis=0)
        D = tl.where(causal, tl.exp(tl.where(causal, bc[:, None] - bc[None, :], 0.)), 0.)
        eb = tl.exp(bc)
        ekb = tl.exp(last - bc)
        M = M * D
        dqkd = dqk * D
    # K Kᵀ and Q Kᵀ over every key first, so only P, M + Mᵀ and dQK ⊙ D stay alive through the blocks of keys
    kk, qk = float32_grams(Q, K_, tok, mt, K, HAS_Q and GATE == 1, BC, BK, PREC)
    # A = strict(Diag(β) (K Kᵀ ⊙ D)): its share of dβ, and of db for a gate
    if GATE == 1:
        kk = kk * D
    dbeta += tl.sum(dA * kk, axis=1)
    if GATE == 1:
        ga = dA * beta[:, None] * kk                                      # dA ⊙ A
        db = tl.sum(ga, axis=1) - tl.sum(ga, axis=0)
        if HAS_Q:
            gq = dqkd * qk                                                # dQK ⊙ QK
            db += tl.sum(gq, axis=1) - tl.sum(gq, axis=0)
    MM = M + tl.trans(M)                       # M K + Mᵀ K in one product (M strictly lower, Mᵀ strictly upper)
    xk = tl.zeros([BC], dtype=tl.float32)        # Σ_k dX_tk k_tk
    qq = tl.zeros([BC], dtype=tl.float32)        # Σ_k dQ̃_tk q_tk
    kbk = tl.zeros([BC], dtype=tl.float32)       # Σ_k dK̄_tk k_tk
    dl = tl.zeros([BK], dtype=tl.float32)
    for ik in range(0, tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        mk = ok < K
        m_tk = mt[:, None] & mk[None, :]
        dw = tl.zeros([BC, BK], dtype=tl.float32)
        dkb = tl.zeros([BC, BK], dtype=tl.float32)
        dqt = tl.zeros([BC, BK], dtype=tl.float32)
        for iv in range(0, tl.cdiv(V, BV)):
            ov = iv * BV + tl.arange(0, BV)
            mv = ov < V
            m_cv = mc[:, None] & mv[None, :]
            m_kv = mk[:, None] & mv[None, :]
            o_cv = row * C * V + oc[:, None] * V + ov[None, :]
            o_kv = row * K * V + ok[:, None] * V + ov[None, :]
            S = tl.load(SN + o_kv, mask=m_kv, other=0.)
            dS = tl.load(DSN + o_kv, mask=m_kv, other=0.)
            dw -= tl.dot(tl.load(DU0 + o_cv, mask=m_cv, other=0.), tl.trans(S), input_precision=PREC)
            dkb += tl.dot(tl.load(UN + o_cv, mask=m_cv, other=0.), tl.trans(dS), input_precision=PREC)
            if HAS_Q:
                do = tl.load(DO + o_cv, mask=m_cv, other=0.).to(tl.float32)
                dqt += tl.dot(do, tl.trans(S), input_precision=PREC)
            if GATE == 1:
                dl += tl.sum(S * dS, axis=1)
        k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(tl.float32)
        dx = tl.dot(tl.trans(P), dw, input_precision=PREC)
        xk += tl.sum(dx * k, axis=1)
        kbk += tl.sum(dkb * k, axis=1)
        dk = tl.dot(MM, k, input_precision=PREC) + dx * (beta * eb)[:, None] + dkb * ekb[:, None]
        if HAS_Q:
            q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(tl.float32)
            qq += tl.sum(dqt * q, axis=1)
            dk += tl.dot(tl.trans(dqkd), q, input_precision=PREC)
            dq = tl.dot(dqkd, k, input_precision=PREC) + (scale * eb)[:, None] * dqt
            tl.store(DQ + tok[:, None] * K + ok[None, :], dq, mask=m_tk)
        tl.store(DK + tok[:, None] * K + ok[None, :], dk, mask=m_tk)
    dbeta += xk * eb
    tl.store(DBETA + tok, dbeta, mask=mt)
    if GATE == 1:
        db += xk * beta * eb - kbk * ekb                                  # X = β exp(b) K; K̄ = exp(b_C - b) K
        if HAS_Q:
            db += scale * qq * eb                                         # Q̃ = exp(b) Q
        dlast = tl.exp(last) * tl.sum(dl, axis=0) + tl.sum(kbk * ekb, axis=0)
        # dg_t = Σ_{t' ≥ t} db_t' + d b_C
        dg = tl.sum(db, axis=0) - tl.cumsum(db, axis=0) + db + dlast
        tl.store(DG + tok, dg, mask=mt)


@triton.jit
def _intra_bwd_per_key(Q, K_, V_, BETA, G, P_, W, U0, UN, SN, DSN, DO, DU0, DQ, DK, DV, DBETA, DG,
                       T, H, N, C, K, V, scale, HAS_Q: tl.constexpr, BC: tl.constexpr, BKS: tl.constexpr,
                       BV: tl.constexpr, PREC: tl.constexpr):
    """Per-key gates, a block of BKS keys at a time: dA = -dY Uᵀ from the blocks of V alone, then each block
    of keys takes its sums over V and its share of the products F_ts = Σ_k a_tk c_sk E_tsk
    (E = exp(b_tk - b_sk), s ≤ t): da = Σ_s dF E c_s, dc = Σ_t dF E a_t, db = a ⊙ da - c ⊙ dc."""
    n, bh = tl.program_id(0), tl.program_id(1)
    oc, mc, mt, tok, row = float32_chunk(n, bh, T, H, N, C, BC)
    m_cc = mc[:, None] & mc[None, :]
    causal = oc[:, None] >= oc[None, :]
    beta = tl.load(BETA + tok, mask=mt, other=0.).to(tl.float32)
    P = tl.load(P_ + row * C * C + oc[:, None] * C + oc[None, :], mask=m_cc, other=0.)
    dA = tl.zeros([BC, BC], dtype=tl.float32)
    dqk = tl.zeros([BC, BC], dtype=tl.float32)
    dbeta = tl.zeros([BC], dtype=tl.float32)
    for iv in range(0, tl.cdiv(V, BV)):                                   # every key: dv, dA = -dY Uᵀ, do Uᵀ
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        m_cv = mc[:, None] & mv[None, :]
        o_cv = row * C * V + oc[:, None] * V + ov[None, :]
        v = tl.load(V_ + tok[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.).to(tl.float32)
        u = tl.load(UN + o_cv, mask=m_cv, other=0.)
        dy = tl.dot(tl.trans(P), tl.load(DU0 + o_cv, mask=m_cv, other=0.), input_precision=PREC)
        dA -= tl.dot(dy, tl.trans(u), input_precision=PREC)
        dbeta += tl.sum(dy * v, axis=1)
        tl.store(DV + tok[:, None] * V + ov[None, :], beta[:, None] * dy, mask=mt[:, None] & mv[None, :])
        if HAS_Q:
            do = tl.load(DO + o_cv, mask=m_cv, other=0.).to(tl.float32)
            dqk += tl.dot(do, tl.trans(u), input_precision=PREC)
    dA = tl.where(oc[:, None] > oc[None, :], dA, 0.)
    dqk = tl.where(causal, scale * dqk, 0.)
    # the decays' products first, KS keys at a time (their `[C, C, KS]` tiles are the kernel's largest): this
    # block's shares of dk, dq and db are written to DK, DQ, DG and read back by the blocks of BKS keys below
    for ib in range(0, tl.cdiv(K, KS)):
        ok = ib * KS + tl.arange(0, KS)
        m = mt[:, None] & (ok < K)[None, :]
        o_tk = tok[:, None] * K + ok[None, :]
        k = tl.load(K_ + o_tk, mask=m, other=0.).to(tl.float32)
        bc = tl.cumsum(tl.load(G + o_tk, mask=m, other=0.).to(tl.float32), axis=0)
        e = tl.where(causal[:, :, None], tl.exp(tl.where(causal[:, :, None], bc[:, None, :] - bc[None, :, :], 0.)),
                     0.)                                                      # [C(t), C(s), KS]
        # A_ts = β_t Σ_k k_tk k_sk E_tsk
        ga = dA[:, :, None] * e
        da = tl.sum(ga * k[None, :, :], axis=1)                               # Σ_s dA_ts E k_s
        dc = tl.sum(ga * (beta[:, None] * k)[:, None, :], axis=0)             # Σ_t dA_ts β_t E k_t
        dbeta += tl.sum(da * k, axis=1)
        dk = beta[:, None] * da + dc
        db = beta[:, None] * da * k - dc * k
        if HAS_Q:
            q = tl.load(Q + o_tk, mask=m, other=0.).to(tl.float32)
            gq = dqk[:, :, None] * e
            dq = tl.sum(gq * k[None, :, :], axis=1)
            dkq = tl.sum(gq * q[:, None, :], axis=0)
            dk += dkq
            db += q * dq - k * dkq
            tl.store(DQ + o_tk, dq, mask=m)
        tl.store(DK + o_tk, dk, mask=m)
        tl.store(DG + o_tk, db, mask=m)
    tl.debug_barrier()                         # the shares above, written by other threads of this program
    for ib in range(0, tl.cdiv(K, BKS)):
        ok = ib * BKS + tl.arange(0, BKS)
        mk = ok < K
        m = mt[:, None] & mk[None, :]
        o_tk = tok[:, None] * K + ok[None, :]
        # this block's sums over V: dW, dQ̃, dK̄ `[C, BKS]` and Σ_v S_n ⊙ dS_{n+1} `[BKS]`
        dw = tl.zeros([BC, BKS], dtype=tl.float32)
        dqt = tl.zeros([BC, BKS], dtype=tl.float32)
        dkb = tl.zeros([BC, BKS], dtype=tl.float32)
        dl = tl.zeros([BKS], dtype=tl.float32)
        for iv in range(0, tl.cdiv(V, BV)):
            ov = iv * BV + tl.arange(0, BV)
            mv = ov < V
            m_cv = mc[:, None] & mv[None, :]
            o_cv = row * C * V + oc[:, None] * V + ov[None, :]
            o_kv = row * K * V + ok[:, None] * V + ov[None, :]
            S = tl.load(SN + o_kv, mask=mk[:, None] & mv[None, :], other=0.)
            dS = tl.load(DSN + o_kv, mask=mk[:, None] & mv[None, :], other=0.)
            dw -= tl.dot(tl.load(DU0 + o_cv, mask=m_cv, other=0.), tl.trans(S), input_precision=PREC)
            dkb += tl.dot(tl.load(UN + o_cv, mask=m_cv, other=0.), tl.trans(dS), input_precision=PREC)
            dl += tl.sum(S * dS, axis=1)
            if HAS_Q:
                do = tl.load(DO + o_cv, mask=m_cv, other=0.).to(tl.float32)
                dqt += tl.dot(do, tl.trans(S), input_precision=PREC)
        k = tl.load(K_ + o_tk, mask=m, other=0.).to(tl.float32)
        bc = tl.cumsum(tl.load(G + o_tk, mask=m, other=0.).to(tl.float32), axis=0)
        last = tl.sum(tl.where(oc[:, None] == C - 1, bc, 0.), axis=0)
        eb = tl.exp(bc)
        ekb = tl.exp(last[None, :] - bc)
        dk = tl.load(DK + o_tk, mask=m, other=0.)
        db = tl.load(DG + o_tk, mask=m, other=0.)
        # X = β exp(b) k
        dx = tl.dot(tl.trans(P), dw, input_precision=PREC)
        dk += dx * beta[:, None] * eb
        dbeta += tl.sum(dx * eb * k, axis=1)
        db += dx * beta[:, None] * eb * k
        if HAS_Q:
            q = tl.load(Q + o_tk, mask=m, other=0.).to(tl.float32)
            dqt = scale * dqt
            dq = tl.load(DQ + o_tk, mask=m, other=0.) + dqt * eb
            db += dqt * q * eb
            tl.store(DQ + o_tk, dq, mask=m)
        ek = dkb * k * ekb                                                    # dK̄ ⊙ K̄
        dk += dkb * ekb
        db -= ek
        dlast = tl.exp(last) * dl + tl.sum(ek, axis=0)
        dg = tl.sum(db, axis=0)[None, :] - tl.cumsum(db, axis=0) + db + dlast[None, :]
        tl.store(DK + o_tk, dk, mask=m)
        tl.store(DG + o_tk, dg, mask=m)
    tl.store(DBETA + tok, dbeta, mask=mt)


def intra_backward(grads: StateGrads, chunks: Chunks, P, *, q, k, v, beta, g, SN, dO, scale: float,
                   block_v: int, block_k: int, num_warps: int, num_stages: int, precision: str):
    """-> (dq or None, dk, dv, dbeta, dg or None), float32, shaped as the inputs, from the recurrence's
    ``inter_backward_states`` (grads: dU_0, the leaving states' gradients, U), the states entering the
    chunks (SN) and do."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N, C = P.shape[2], P.shape[3]
    has_q = q is not None
    f32 = dict(device=k.device, dtype=torch.float32)
    dq = torch.empty(B, T, H, K, **f32) if has_q else None
    dk, dv, dbeta = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, V, **f32), torch.empty(B, T, H, **f32)
    dg = torch.empty(g.shape, **f32) if g is not None else None
    if has_q and dO is None:
        dO = torch.zeros_like(chunks.U0)
    c = lambda x: x.contiguous() if x is not None else None  # noqa: E731
    args = (c(q), c(k), c(v), c(beta), c(g), c(P), c(chunks.W), c(chunks.U0), c(grads.U), c(SN), c(grads.dSN),
            c(dO) if has_q else None, c(grads.dU0), dq, dk, dv, dbeta, dg, T, H, N, C, K, V, scale)
    BV = min(block_v, pow2(V))
    if g is not None and g.dim() == 4:
        _intra_bwd_per_key[(N, B * H)](*args, HAS_Q=has_q, BC=pow2(C), BKS=block_k, BV=BV, PREC=precision,
                                       num_warps=num_warps, num_stages=num_stages)
    else:
        _intra_bwd[(N, B * H)](*args, HAS_Q=has_q, GATE=int(g is not None), BC=pow2(C),
                               BK=min(block_k, pow2(K)), BV=BV, PREC=precision, num_warps=num_warps,
                               num_stages=num_stages)
    return dq, dk, dv, dbeta, dg
