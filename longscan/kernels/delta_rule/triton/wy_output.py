"""path="wy", the output: one program per (block of V columns, chunk, sequence, head), every chunk at once,
from the state entering it S and its v_n (``wy_state``):
    o = scale (Q̃ S + (Q Kᵀ ⊙ D) v_n),    Q̃_t = exp(b_t) q_t,  D_ts = exp(b_t - b_s) for s ≤ t, else 0;
per-key gates: Q̃ = Q ⊙ exp(b) and (Q Kᵀ ⊙ D)_ts = Σ_k q_tk k_sk exp(b_tk - b_sk), both as ``wy_prep`` wrote
them (QG, QK), so the programs of a chunk's V blocks read them rather than each forming them again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longscan.kernels.delta_rule.triton.wy_decay import BT, PER_KEY, SCALAR, gate_kind


@triton.jit
def _wy_output(Q, K_, G, QG, QK, HS, VN, O, T, H, N, K, V, scale, GATE: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, PREC: tl.constexpr):
    iv, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    oc = tl.arange(0, BT)
    ov = iv * BV + tl.arange(0, BV)
    mv = ov < V
    t = n * BT + oc
    mt = t < T
    tok0 = ((b * T + n * BT) * H + h).to(tl.int64)   # int64 bases, int32 offsets in the chunk
    tok = oc * H
    row0 = ((bh * N + n) * BT).to(tl.int64)
    row = oc
    VN = VN + row0 * V
    if GATE == SCALAR:   # b `[B, H, N·BT]`, as ``wy_prep`` wrote it
        G = G + row0
    K_, Q = K_ + tok0 * K, Q + tok0 * K
    if GATE == PER_KEY:   # Q̃ `[B, H, N·BT, K]` and the decayed scores `[B, H, N·BT, BT]`, as ``wy_prep`` wrote them
        QG = QG + row0 * K
    O = O + tok0 * V
    dt = VN.dtype.element_ty
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    qs = tl.zeros([BT, BV], dtype=tl.float32)
    for ik in range(0, tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        mk = ok < K
        o_kv = (bh * N + n).to(tl.int64) * K * V + ok[:, None] * V + ov[None, :]
        s = tl.load(HS + o_kv, mask=mk[:, None] & mv[None, :], other=0.)
        if GATE == PER_KEY:
            qs += tl.dot(tl.load(QG + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.), s,
                         input_precision=PREC)
        else:
            q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.).to(dt)
            k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.).to(dt)
            qk += tl.dot(q, tl.trans(k), input_precision=PREC)
            qs += tl.dot(q, s, input_precision=PREC)
    causal = oc[:, None] >= oc[None, :]
    if GATE == PER_KEY:
        qkc = tl.load(QK + (bh * N + n).to(tl.int64) * BT * BT + oc[:, None] * BT + oc[None, :])
    else:
        if GATE == SCALAR:
            bc = tl.load(G + row)
            qs = qs * tl.exp(bc)[:, None]
            qk = qk * tl.exp(tl.where(causal, bc[:, None] - bc[None, :], 0.))
        qkc = tl.where(causal, qk, 0.).to(dt)
    vn = tl.load(VN + row[:, None] * V + ov[None, :], mask=mv[None, :], other=0.)
    o = scale * (qs + tl.dot(qkc, vn, input_precision=PREC))
    tl.store(O + tok[:, None] * V + ov[None, :], o.to(O.dtype.element_ty), mask=mt[:, None] & mv[None, :])


def wy_output(q, k, g, QG, QK, HS, VN, scale: float, *, block_k: int, block_v: int, num_warps: int,
              precision: str):
    """-> o `[B, T, H, V]` in q's dtype. QG, QK: per-key gates' Q̃ and decayed scores (``wy_prep.Prepared``), else
    None."""
    B, T, H, K = q.shape
    V = VN.shape[-1]
    N = HS.shape[2]
    gate = gate_kind(g)
    if (gate == PER_KEY) != (QK is not None and QG is not None):
        raise ValueError("wy_output takes QG and QK for per-key gates and for them only")
    O = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    BV = min(block_v, max(16, triton.next_power_of_2(V)))
    _wy_output[(triton.cdiv(V, BV), N, B * H)](q, k, g, QG, QK, HS, VN, O, T, H, N, K, V, scale, GATE=gate,
                                               BK=block_k, BV=BV, PREC=precision, num_warps=num_warps)
    return O
