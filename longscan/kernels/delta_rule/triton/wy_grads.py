"""path="wy", the parallel backward stages: one program per (chunk, sequence, head).

Per chunk, with S the state entering it, dS' the gradient of the state leaving it, v_n and dv_n (``wy_state``),
b the cumulative log gate (zero without a gate), b_C its total, D_ts = exp(b_t - b_s) (s ≤ t):
- ``_wy_dv_local``: dv_local = scale (Q Kᵀ ⊙ D)ᵀ do, the output's share of dv_n (before the serial pass; per-key
  gates' Q Kᵀ ⊙ D as ``wy_prep`` wrote it);
- ``_wy_dqkw`` (one block of keys a program): dq = scale exp(b) (do Sᵀ) + dF K, k's first share
  dFᵀ Q + exp(b_C - b) (v_n dS'ᵀ), dW = -dv_n Sᵀ, with dF = scale (do v_nᵀ) ⊙ D (lower), and the gate's
  shares of db from Q̃, K̄, D and exp(b_C) S;
- ``_wy_bwd``: through W = P X, U = P Y, P = (I + A)⁻¹ (X = Diag(β exp(b)) K, Y = Diag(β) V):
      dX = Pᵀ dW,  dY = Pᵀ dU (dU = dv_n),  dA = -(dX Wᵀ + dY Uᵀ) (strictly lower)
  to dk, dv, dβ, and db; then dg_t = Σ_{t' ≥ t} db_t' (b = cumsum g in the chunk). With DA_INPUTS (no gate
  or a scalar gate) dA = -Pᵀ (dU Yᵀ + dW Xᵀ) Pᵀ, the same matrix from the inputs the kernel reads anyway
  (v, k) instead of U and W, for two `[BT, BT]` products more.
For a scalar gate every factor exp(b_t - b_s) of a product F_ts gives db_t += Σ_s dF_ts F_ts and
db_s -= Σ_t dF_ts F_ts, so ``_wy_dqkw``'s db is Σ_k (q ⊙ dq - k ⊙ dk) (plus b_C's terms on the last row), a
`[BT]` share a block of keys that ``_wy_bwd`` sums; its kernels read b as ``wy_prep`` wrote it (G), per-key gates'
too (b `[BT, K]` a chunk), which form the decayed products through ``wy_decay``; each
factor exp(b_tk) of an operand x_tk gives db_tk += x_tk dx_tk and each exp(-b_sk) db_sk -= y_sk dy_sk, so
``_wy_dqkw``'s db is q ⊙ dq - k ⊙ dk (plus b_C's terms on the last row), and ``_wy_bwd`` adds
X ⊙ dX and, with R = Σ_s dA_ts k_s exp(b_t - b_s) and C = Σ_t β_t dA_ts k_t exp(b_t - b_s), β k ⊙ R - k ⊙ C.
Products take the inputs' dtype as operands, accumulate in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from longscan.kernels.delta_rule.triton.common import gate_width, wy_chunk
from longscan.kernels.delta_rule.triton.wy_decay import (BT, NO_GATE, PER_KEY, SCALAR, decayed_rows_cols, gate_kind,
                                                         load_refs)

WY_BWD_BLOCK_K = 32   # keys a step of ``_wy_bwd`` (beside its `[64, 64]` P, dA and K Kᵀ: at 64 it spills)
WY_BWD_PER_KEY_BLOCK_K = 16   # the same for per-key gates (`[64, 64]` P, dA, β dA and decay factors: at 32 it spills)


def bwd_block_k(block_k: int, gate: int) -> int:
    """Keys a step of ``_wy_bwd`` for the parallel kernels' block_k and the kernels' GATE."""
    return min(WY_BWD_PER_KEY_BLOCK_K if gate == PER_KEY else WY_BWD_BLOCK_K, block_k)


@triton.jit
def _wy_dv_local(Q, K_, G, QK, DO, DVL, T, H, N, K, V, scale, GATE: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, PREC: tl.constexpr):
    """Per-key gates read the decayed scores QK as ``wy_prep`` wrote them (in the operands' dtype) and scale the
    product; the other gates form Q Kᵀ ⊙ D here and scale it before it is rounded."""
    n, bh = tl.program_id(0), tl.program_id(1)
    oc, mt, tok0, tok, row0 = wy_chunk(n, bh, T, H, N)
    row = oc
    DVL = DVL + row0 * V
    if GATE == SCALAR:   # b `[B, H, N·BT]`, as ``wy_prep`` wrote it
        G = G + row0
    K_, Q = K_ + tok0 * K, Q + tok0 * K
    DO = DO + tok0 * V
    dt = DVL.dtype.element_ty
    if GATE == PER_KEY:
        qkt = tl.trans(tl.load(QK + (bh * N + n).to(tl.int64) * BT * BT + oc[:, None] * BT + oc[None, :]))
        after = scale
    else:
        qk = tl.zeros([BT, BT], dtype=tl.float32)
        for ik in range(0, tl.cdiv(K, BK)):
            ok = ik * BK + tl.arange(0, BK)
            m = mt[:, None] & (ok < K)[None, :]
            q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(dt)
            k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m, other=0.).to(dt)
            qk += tl.dot(q, tl.trans(k), input_precision=PREC)
        causal = oc[:, None] >= oc[None, :]
        if GATE == SCALAR:
            bc = tl.load(G + row)
            qk = qk * tl.exp(tl.where(causal, bc[:, None] - bc[None, :], 0.))
        qkt = tl.trans(tl.where(causal, scale * qk, 0.)).to(dt)
        after = 1.
    for iv in range(0, tl.cdiv(V, BV)):
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        do = tl.load(DO + tok[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.).to(dt)
        tl.store(DVL + row[:, None] * V + ov[None, :], (after * tl.dot(qkt, do, input_precision=PREC)).to(dt),
                 mask=mv[None, :])


@triton.jit
def _wy_dqkw(Q, K_, G, HS, DHS, VN, DVN, DO, DQ, DK, DW, DB, T, H, N, K, V, scale, GATE: tl.constexpr,
             HAS_Q: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """One block of BK keys a program (grid: blocks of keys, chunks, sequences × heads); its share of db goes
    to DB[block of keys], summed after (a scalar gate), or to DB's own keys (per-key gates). Without q (a
    segment transition) there is no output: no dq and none of do's terms."""
    ik, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    oc, mt, tok0, tok, row0 = wy_chunk(n, bh, T, H, N)
    row = oc
    gk = gate_width(K, GATE)   # a gate a key: G, DB and DG hold K values a token
    DW = DW + row0 * K
    if GATE == PER_KEY:   # b `[B, H, N·BT, K]`, as ``wy_prep`` wrote it
        G, DB = G + row0 * K, DB + row0 * gk
    if GATE == SCALAR:   # b `[B, H, N·BT]`, as ``wy_prep`` wrote it
        G, DB = G + row0, DB + row0
    DVN, VN = DVN + row0 * V, VN + row0 * V
    DK, K_ = DK + tok0 * K, K_ + tok0 * K
    if HAS_Q:
        DQ, Q, DO = DQ + tok0 * K, Q + tok0 * K, DO + tok0 * V
    ok = ik * BK + tl.arange(0, BK)
    mk = ok < K
    m_tk = mt[:, None] & mk[None, :]
    dt = VN.dtype.element_ty
    causal = oc[:, None] >= oc[None, :]
    dqs = tl.zeros([BT, BK], dtype=tl.float32)   # do Sᵀ
    dw = tl.zeros([BT, BK], dtype=tl.float32)
    dkb = tl.zeros([BT, BK], dtype=tl.float32)   # v_n dS'ᵀ
    df = tl.zeros([BT, BT], dtype=tl.float32)    # do v_nᵀ
    dl = tl.zeros([BK], dtype=tl.float32)
    dls = 0.   # a scalar gate's Σ S ⊙ dS'
    for iv in range(0, tl.cdiv(V, BV)):
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        o_kv = (bh * N + n).to(tl.int64) * K * V + ok[:, None] * V + ov[None, :]
        s = tl.load(HS + o_kv, mask=mk[:, None] & mv[None, :], other=0.)
        ds = tl.load(DHS + o_kv, mask=mk[:, None] & mv[None, :], other=0.)
        vn = tl.load(VN + row[:, None] * V + ov[None, :], mask=mv[None, :], other=0.)
        dvn = tl.load(DVN + row[:, None] * V + ov[None, :], mask=mv[None, :], other=0.)
        if HAS_Q:
            do = tl.load(DO + tok[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.).to(dt)
            df += tl.dot(do, tl.trans(vn), input_precision=PREC)
            dqs += tl.dot(do, tl.trans(s), input_precision=PREC)
        dw -= tl.dot(dvn, tl.trans(s), input_precision=PREC)
        dkb += tl.dot(vn, tl.trans(ds), input_precision=PREC)
        if GATE == SCALAR:
            dls += tl.sum(tl.sum(s.to(tl.float32) * ds.to(tl.float32), axis=1), axis=0)
        if GATE == PER_KEY:
            dl += tl.sum(s.to(tl.float32) * ds.to(tl.float32), axis=1)
    tl.store(DW + row[:, None] * K + ok[None, :], dw.to(dt), mask=mk[None, :])
    df = tl.where(causal, scale * df, 0.)
    if HAS_Q:
        q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(dt)
    k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(dt)
    if GATE == PER_KEY:
        bk = tl.load(G + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
        kf = k.to(tl.float32)
        if HAS_Q:
            dfc = df.to(dt)
            qf = q.to(tl.float32)
            # F's shares of dq and dk from one set of decay factors
            r0, r1, r2, r3 = load_refs(G, ok, mk, K)
            fq, fk = decayed_rows_cols(dfc, kf, dfc, qf, bk, r0, r1, r2, r3, oc, PREC)
            dq = dqs * (scale * tl.exp(bk)) + fq                          # dQ̃'s, F's shares
            db = qf * dq
            tl.store(DQ + tok[:, None] * K + ok[None, :], dq.to(DQ.dtype.element_ty), mask=m_tk)
        else:
            db = tl.zeros([BT, BK], dtype=tl.float32)
        last = tl.load(G + (BT - 1) * K + ok, mask=mk, other=0.)
        ekb = kf * dkb * tl.exp(last[None, :] - bk)                       # K̄ ⊙ dK̄
        dk = dkb * tl.exp(last[None, :] - bk)
        if HAS_Q:
            dk += fk
        # every exp(b) factor's share (Q̃, K̄, the decayed scores), then b_C's (K̄ and Diag(exp(b_C)) S)
        db -= kf * dk
        db += tl.where((oc == BT - 1)[:, None], (tl.exp(last) * dl + tl.sum(ekb, axis=0))[None, :], 0.)
        tl.store(DB + row[:, None] * K + ok[None, :], db, mask=mk[None, :])
    else:
        if GATE == SCALAR:
            bc = tl.load(G + row)
            last = tl.load(G + BT - 1)
            dkb = dkb * tl.exp(last - bc)[:, None]                            # dK̄'s share of dk
            # b_C's shares (K̄ = exp(b_C - b) k and exp(b_C) S), to b at the chunk's last row
            dlast = tl.exp(last) * dls + tl.sum(tl.sum(dkb * k.to(tl.float32),
                                                                                        axis=1), axis=0)
            if HAS_Q:
                dqs = dqs * (scale * tl.exp(bc))[:, None]                     # dQ̃'s share of dq
                df = df * tl.exp(tl.where(causal, bc[:, None] - bc[None, :], 0.))
        else:
            dqs = scale * dqs
        # a scalar gate: every exp(±b) factor's share from the gradients as they are formed: Q̃'s and F's rows
        # q·dq, K̄'s and F's columns -k·dk (Σ_s dF_ts F_ts = q_t·(dF K)_t, Σ_t dF_ts F_ts = k_s·(dFᵀ Q)_s: no
        # Q Kᵀ product), each taken as soon as its gradient is (fewer live tiles)
        db = tl.zeros([BT], dtype=tl.float32)
        if HAS_Q:
            dfc = df.to(dt)
            dq = dqs + tl.dot(dfc, k, input_precision=PREC)
            tl.store(DQ + tok[:, None] * K + ok[None, :], dq.to(DQ.dtype.element_ty), mask=m_tk)
            if GATE == SCALAR:
                db += tl.sum(dq * q.to(tl.float32), axis=1)
            dk = dkb + tl.dot(tl.trans(dfc), q, input_precision=PREC)
        else:
            dk = dkb
        if GATE == SCALAR:
            db += tl.where(oc == BT - 1, dlast, 0.) - tl.sum(dk * k.to(tl.float32), axis=1)
            tl.store(DB + ik * (tl.num_programs(2) * N * BT) + row, db)
    tl.store(DK + tok[:, None] * K + ok[None, :], dk.to(DK.dtype.element_ty), mask=m_tk)


@triton.jit
def _wy_bwd(K_, V_, BETA, G, P_, W, U, DVN, DW, DB, DK, DV, DBETA, DG, T, H, N, K, V, NDB, GATE: tl.constexpr,
            BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, DA_INPUTS: tl.constexpr):
    """A scalar gate's db arrives as NDB `[BT]` shares a chunk (one a block of keys of ``_wy_dqkw``), summed here.
    DA_INPUTS (not per-key gates): dA accumulates dU Yᵀ + dW Xᵀ in the loops, then becomes -Pᵀ (·) Pᵀ."""
    n, bh = tl.program_id(0), tl.program_id(1)
    oc, mt, tok0, tok, row0 = wy_chunk(n, bh, T, H, N)
    row = oc
    P_ = P_ + row0 * BT
    gk = gate_width(K, GATE)   # a gate a key: G, DB and DG hold K values a token
    DW, W = DW + row0 * K, W + row0 * K
    DVN, U = DVN + row0 * V, U + row0 * V
    BETA, DBETA = BETA + tok0, DBETA + tok0
    if GATE == PER_KEY:   # b `[B, H, N·BT, K]`, as ``wy_prep`` wrote it
        G, DB, DG = G + row0 * K, DB + row0 * gk, DG + tok0 * gk
    if GATE == SCALAR:   # b `[B, H, N·BT]`, as ``wy_prep`` wrote it
        G, DB, DG = G + row0, DB + row0, DG + tok0
    DK, K_ = DK + tok0 * K, K_ + tok0 * K
    DV, V_ = DV + tok0 * V, V_ + tok0 * V
    dt = P_.dtype.element_ty
    pt = tl.trans(tl.load(P_ + row[:, None] * BT + oc[None, :]))
    beta = tl.load(BETA + tok, mask=mt, other=0.).to(tl.float32)
    eb = tl.full([BT], 1., tl.float32)
    if GATE == SCALAR:
        bc = tl.load(G + row)
        eb = tl.exp(bc)
        db = tl.load(DB + row)
        for i in range(1, NDB):
            db += tl.load(DB + i * (tl.num_programs(1) * N * BT) + row)
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    for iv in range(0, tl.cdiv(V, BV)):
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        dvn = tl.load(DVN + row[:, None] * V + ov[None, :], mask=mv[None, :], other=0.)
        dy = tl.dot(pt, dvn, input_precision=PREC)
        v = tl.load(V_ + tok[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.).to(tl.float32)
        if DA_INPUTS:   # dU Yᵀ
            dA += tl.dot(dvn, tl.trans((beta[:, None] * v).to(dt)), input_precision=PREC)
        else:
            u = tl.load(U + row[:, None] * V + ov[None, :], mask=mv[None, :], other=0.)
            dA -= tl.dot(dy.to(dt), tl.trans(u), input_precision=PREC)
        dbeta += tl.sum(dy * v, axis=1)
        tl.store(DV + tok[:, None] * V + ov[None, :], (beta[:, None] * dy).to(DV.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    for ik in range(0, tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        mk = ok < K
        k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.)
        dwb = tl.load(DW + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.).to(dt)
        dx = tl.dot(pt, dwb, input_precision=PREC)
        if DA_INPUTS:   # dW Xᵀ, X = Diag(β exp(b)) K
            dA += tl.dot(dwb, tl.trans(((beta * eb)[:, None] * k.to(tl.float32)).to(dt)), input_precision=PREC)
        else:
            w = tl.load(W + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
            dA -= tl.dot(dx.to(dt), tl.trans(w), input_precision=PREC)
        if GATE != PER_KEY:   # per-key gates take X's and A's shares in the pass below, key by key
            kk += tl.dot(k.to(dt), tl.trans(k.to(dt)), input_precision=PREC)
            xk = tl.sum(dx * eb[:, None] * k.to(tl.float32), axis=1)      # Σ_k dX exp(b) k
            dbeta += xk
            if GATE == SCALAR:
                db += beta * xk                                           # Σ_k dX ⊙ X
    causal = oc[:, None] >= oc[None, :]
    if DA_INPUTS:   # -Pᵀ (dU Yᵀ + dW Xᵀ) Pᵀ
        dA = -tl.dot(pt, tl.dot(dA.to(dt), pt, input_precision=PREC).to(dt), input_precision=PREC)
    dA = tl.where(oc[:, None] > oc[None, :], dA, 0.)
    M = dA * beta[:, None]
    if GATE == PER_KEY:
        dAc, Mc = dA.to(dt), M.to(dt)
        for ik in range(0, tl.cdiv(K, BK)):
            ok = ik * BK + tl.arange(0, BK)
            mk = ok < K
            m_tk = mt[:, None] & mk[None, :]
            kf = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(dt).to(tl.float32)
            bk = tl.load(G + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
            r0, r1, r2, r3 = load_refs(G, ok, mk, K)
            dx = tl.dot(pt, tl.load(DW + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.).to(dt),
                        input_precision=PREC)
            xg = beta[:, None] * tl.exp(bk) * dx                          # dX's share of dk
            # r_t = Σ_s dA_ts k_s exp(b_t - b_s), c_s = Σ_t β_t dA_ts k_t exp(b_t - b_s)
            r, c = decayed_rows_cols(dAc, kf, Mc, kf, bk, r0, r1, r2, r3, oc, PREC)
            dbeta += tl.sum(kf * (tl.exp(bk) * dx + r), axis=1)
            dk = tl.load(DK + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(tl.float32)
            dk += xg + beta[:, None] * r + c
            tl.store(DK + tok[:, None] * K + ok[None, :], dk.to(DK.dtype.element_ty), mask=m_tk)
            db = tl.load(DB + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
            db += kf * (xg + beta[:, None] * r - c)
            tl.store(DG + tok[:, None] * K + ok[None, :],
                     tl.sum(db, axis=0)[None, :] - tl.cumsum(db, axis=0) + db, mask=m_tk)
    else:
        if GATE == SCALAR:
            dmat = tl.exp(tl.where(causal, bc[:, None] - bc[None, :], 0.))   # D, formed once for A and M
            kk = kk * dmat
        dbeta += tl.sum(dA * kk, axis=1)
        if GATE == SCALAR:
            ga = M * kk                                                   # dA ⊙ A
            db += tl.sum(ga, axis=1) - tl.sum(ga, axis=0)
            M = M * dmat
            tl.store(DG + tok, tl.sum(db, axis=0) - tl.cumsum(db, axis=0) + db, mask=mt)
        MM = (M + tl.trans(M)).to(dt)          # M K + Mᵀ K in one product (M strictly lower)
        for ik in range(0, tl.cdiv(K, BK)):
            ok = ik * BK + tl.arange(0, BK)
            mk = ok < K
            m_tk = mt[:, None] & mk[None, :]
            k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(dt)
            dx = tl.dot(pt, tl.load(DW + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.).to(dt),
                        input_precision=PREC)
            dk = tl.load(DK + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(tl.float32)
            dk += (beta * eb)[:, None] * dx + tl.dot(MM, k, input_precision=PREC)
            tl.store(DK + tok[:, None] * K + ok[None, :], dk.to(DK.dtype.element_ty), mask=m_tk)
    tl.store(DBETA + tok, dbeta, mask=mt)


def wy_dv_local(q, k, g, QK, dO, scale: float, *, V: int, block_k: int, block_v: int, num_warps: int,
                precision: str) -> torch.Tensor:
    """The output's share of dv_n, dv_local = scale (Q Kᵀ ⊙ D)ᵀ do `[B, H, N·BT, V]` in k's dtype (the serial
    pass's input); column-wise in V, and it needs no state. QK: per-key gates' decayed scores
    (``wy_prep.Prepared``), else None."""
    B, T, H, K = k.shape
    N = triton.cdiv(T, 64)
    gate = gate_kind(g)
    if (gate == PER_KEY) != (QK is not None):
        raise ValueError("wy_dv_local takes QK for per-key gates and for them only")
    BV = min(block_v, max(16, triton.next_power_of_2(V)))
    dv_local = torch.empty(B, H, N * 64, V, device=k.device, dtype=k.dtype)
    _wy_dv_local[(N, B * H)](q, k, g, QK, dO, dv_local, T, H, N, K, V, scale, GATE=gate, BK=block_k, BV=BV,
                             PREC=precision, num_warps=num_warps)
    return dv_local


def wy_input_grads(q, k, v, beta, g, P, W, U, HS, VN, DHS, DVN, dO, scale: float, *, block_k: int, block_v: int,
                   num_warps: int, precision: str, max_registers: Optional[int], da_from_inputs: bool):
    """The parallel stages after the serial pass (``_wy_dqkw``, then ``_wy_bwd``), from the states entering and
    the gradients leaving each chunk (HS, DHS) and v_n, dv_n (VN, DVN) over every V column ->
    (dq (None when q is None), dk, dv in k's dtype, dβ, dg or None float32). max_registers: both kernels'
    registers a thread (Triton's maxnreg), None: ptxas's choice. da_from_inputs: ``_wy_bwd`` forms dA from v and
    k instead of U and W (no gate or a scalar gate; per-key gates keep U and W)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = HS.shape[2]
    f32 = dict(device=k.device, dtype=torch.float32)
    BV = min(block_v, max(16, triton.next_power_of_2(V)))
    gate = gate_kind(g)
    kw = dict(GATE=gate, BK=block_k, BV=BV, PREC=precision, num_warps=num_warps)
    if max_registers is not None:
        kw["maxnreg"] = max_registers
    has_q = q is not None
    dq, dk = (torch.empty_like(k) if has_q else None), torch.empty_like(k)
    dW = torch.empty_like(W)
    NK = triton.cdiv(K, block_k)
    # a scalar gate's db: one `[BT]` share a block of keys, summed by ``_wy_bwd``; per-key gates': each key its own
    db = (None if gate == NO_GATE else torch.empty(NK, B, H, N * 64, **f32) if gate == SCALAR
          else torch.empty(B, H, N * 64, K, **f32))
    _wy_dqkw[(NK, N, B * H)](q, k, g, HS, DHS, VN, DVN, dO, dq, dk, dW, db, T, H, N, K, V, scale, HAS_Q=has_q,
                             **kw)
    dv, dbeta = torch.empty(B, T, H, V, device=k.device, dtype=k.dtype), torch.empty(B, T, H, **f32)
    # g: the gate's cumulative sums in each chunk (``wy_prep``); dg `[B, T, H]` as β, or `[B, T, H, K]` as k
    dg = None if g is None else torch.empty(beta.shape if gate == SCALAR else k.shape, **f32)
    kw["BK"] = bwd_block_k(block_k, gate)
    _wy_bwd[(N, B * H)](k, v, beta, g, P, W, U, DVN, dW, db, dk, dv, dbeta, dg, T, H, N, K, V, NK,
                        DA_INPUTS=da_from_inputs and gate != PER_KEY, **kw)
    return dq, dk, dv, dbeta, dg


def wy_grads(q, k, v, beta, g, QK, P, W, U, HS, VN, dO, scale: float, state_backward, *, block_k: int, block_v: int,
             num_warps: int, precision: str, max_registers: Optional[int], da_from_inputs: bool):
    """-> (dq (None when q is None: a segment transition, no output), dk, dv in k's dtype, dβ, dg or None and
    dS_0 float32). ``state_backward(dv_local) ->
    (dS' a chunk, dv_n, dS_0)`` is the serial pass (``wy_state.wy_state_backward``), run between the two
    parallel ones. dq, dk, dv and the intermediate dW and k's first share are written in k's dtype (sums in
    float32 within each kernel), as the forward's chunk quantities are."""
    kw = dict(block_k=block_k, block_v=block_v, num_warps=num_warps, precision=precision)
    # the output's share of dv_n; a segment transition has no output
    dv_local = wy_dv_local(q, k, g, QK, dO, scale, V=v.shape[-1], **kw) if q is not None else None
    DHS, DVN, dh0 = state_backward(dv_local)
    return wy_input_grads(q, k, v, beta, g, P, W, U, HS, VN, DHS, DVN, dO, scale, max_registers=max_registers,
                          da_from_inputs=da_from_inputs, **kw) + (dh0,)
