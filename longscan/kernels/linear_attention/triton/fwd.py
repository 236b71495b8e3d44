"""The output passes: the chunked forward from each segment's entering state, and the prefix correction
o + scale·(q⊙exp(A))ᵀP."""
from __future__ import annotations

import triton
import triton.language as tl

from longscan.kernels.linear_attention.triton.common import (_chunk_decays, _chunk_keys, _chunk_totals, _gate_chunk,
                                                             _segment_program, _segment_state_tile)


@triton.jit
def _fwd_kernel(q, k, kd, v, g, gg, o, h0, ht, T, H, SEG, NC, scale,
                K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, RESETS: tl.constexpr):
    """One (V-tile, batch·head, segment): o for the segment's tokens, starting from state h0[bh, seg].
    Per-key gates (GATE 3) read _gate_operands_kernel's outputs: q and kd are qd and kd, g the chunk totals (k is
    not read: level 0's keys come from kd). RESETS: g (GATE 2) may hold −inf, and the decays select past a
    reset (common._scalar_cumulative); off, the finite-gate arithmetic."""
    iv, _, bh, js, ns, b, h = _segment_program(H)
    dt = q.dtype.element_ty
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    causal = rc[:, None] >= rc[None, :]
    t_start = js * SEG
    t_end = tl.minimum(t_start + SEG, T)
    S = tl.zeros([K, BV], dtype=tl.float32)
    if HAS_H0:
        S += _segment_state_tile(h0, bh, js, ns, rk, rv, K, V)
    gamma = 0.0
    if GATE == 1:
        gamma = tl.load(gg + h).to(tl.float32)
    for t0 in range(t_start, t_end, C):
        t = t0 + rc
        m = t < t_end
        row = (b * T + t).to(tl.int64) * H + h
        bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
        if GATE == 3:
            bl = _chunk_totals(g, bh, t0, NC, rk, K, C)
        bk, bkd = _chunk_keys(k, kd, g, row, m, bh, t0, NC, rk, K, C, GATE)
        bv = tl.load(v + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        if GATE == 0 or GATE == 3:
            A = tl.where(causal, tl.dot(bq, tl.trans(bk), input_precision=PREC), 0.0)
            acc = tl.dot(bq, S.to(dt), input_precision=PREC)
            acc += tl.dot(A.to(dt), bv, input_precision=PREC)
            if GATE == 0:
                S += tl.dot(tl.trans(bk), bv, input_precision=PREC)
            else:
                S = S * tl.exp(bl)[:, None] + tl.dot(tl.trans(bkd), bv, input_precision=PREC)
        else:
            gc = _gate_chunk(g, gamma, b, h, t, m, T, H, rk, K, GATE)
            if GATE == 2 and RESETS:
                # the decayed causal scores and the chunk's decays, selecting only where a reset lies (_chunk_decays)
                d, eq, ek, es = _chunk_decays(gc, causal, False)
                A = tl.where(causal, tl.dot(bq, tl.trans(bk), input_precision=PREC) * d, 0.0)
                acc = tl.dot(bq, S.to(dt), input_precision=PREC) * eq[:, None]
                acc += tl.dot(A.to(dt), bv, input_precision=PREC)
                S = S * es + tl.dot(tl.trans((bk * ek[:, None]).to(dt)), bv, input_precision=PREC)
            else:
                # finite gates, in the order of the kernels before resets (which they compile to, ptx_diff.py):
                # the chunk-local cumulative log gate [C] and the chunk's total
                bt, blt = tl.cumsum(gc, 0), tl.sum(gc, 0)
                A = tl.dot(bq, tl.trans(bk), input_precision=PREC)
                A = tl.where(causal, A * tl.exp(bt[:, None] - bt[None, :]), 0.0)
                acc = tl.dot(bq, S.to(dt), input_precision=PREC) * tl.exp(bt)[:, None]
                acc += tl.dot(A.to(dt), bv, input_precision=PREC)
                kd_ = (bk * tl.exp(blt - bt)[:, None]).to(dt)
                S = S * tl.exp(blt) + tl.dot(tl.trans(kd_), bv, input_precision=PREC)
        tl.store(o + row[:, None] * V + rv[None, :], (acc * scale).to(o.dtype.element_ty), mask=m[:, None])
    if STORE_HT:
        if js == ns - 1:
            tl.store(ht + bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :], S)


@triton.jit
def _prefix_kernel(o, q, g, gg, goff, P, out, T, H, NC, scale,
                   K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                   PREC: tl.constexpr):
    """One chunk: out = o + scale·(q ⊙ exp(A))ᵀ P, A the segment-inclusive cumulative log gate
    (goff[b, n, h] holds the log gate summed over the chunks before this one)."""
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    n = tl.program_id(2)
    b = bh // H
    h = bh % H
    dt = q.dtype.element_ty
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    t = n * C + rc
    m = t < T
    row = (b * T + t).to(tl.int64) * H + h
    bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    bP = tl.load(P + bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]).to(tl.float32)
    if GATE > 0:
        gamma = 0.0
        if GATE == 1:
            gamma = tl.load(gg + h).to(tl.float32)
        gc = _gate_chunk(g, gamma, b, h, t, m, T, H, rk, K, GATE)
        bc = tl.cumsum(gc, 0)
        if GATE == 1:
            bc += (n * C).to(tl.float32) * gamma
        elif GATE == 2:
            bc += tl.load(goff + ((b * NC + n) * H + h).to(tl.int64))
        else:
            bc += tl.load(goff + ((b * NC + n) * H + h).to(tl.int64) * K + rk)[None, :]
        if GATE == 3:
            bq = bq * tl.exp(bc)
        else:
            bq = bq * tl.exp(bc)[:, None]
    acc = tl.dot(bq.to(dt), bP.to(dt), input_precision=PREC)
    bo = tl.load(o + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    tl.store(out + row[:, None] * V + rv[None, :], (bo + scale * acc).to(out.dtype.element_ty), mask=m[:, None])



def run_forward(*, qx, kx, kdx, v, gx, gg, o, h0, ht, T, H, seg, ns, C, scale, GATE, BV, store_ht, prec, resets,
                dummy, cfg):
    """Launch _fwd_kernel over (V-tiles, batch·heads, segments): o from each segment's entering state h0 (None:
    zero; dummy stands in for it); the final state into ht when the sequence is one segment (store_ht); resets:
    g may hold −inf (the kernel's RESETS)."""
    B_H = o.shape[0] * H
    K, V = qx.shape[-1], v.shape[-1]
    _fwd_kernel[(V // BV, B_H, ns)](qx, kx, kdx, v, gx, gg, o, h0 if h0 is not None else dummy,
                                    ht if ht is not None else o, T, H, seg, triton.cdiv(T, C), scale,
                                    K=K, V=V, BV=BV, C=C, GATE=GATE, HAS_H0=h0 is not None,
                                    STORE_HT=store_ht, PREC=prec, RESETS=resets, **cfg)


def run_prefix(*, o, q, gt, gg, goff, P, out, T, H, N, C, scale, GATE, prec):
    """Launch _prefix_kernel over (V-tiles, batch·heads, chunks): out = o + scale·(q⊙exp(A))ᵀP."""
    B, _, _, K = q.shape
    V = o.shape[-1]
    BV = min(V, 64)
    _prefix_kernel[(V // BV, B * H, N)](o, q, gt, gg, goff, P, out, T, H, N, scale, K=K, V=V, BV=BV, C=C,
                                        GATE=GATE, PREC=prec, num_warps=4)
