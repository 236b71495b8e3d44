"""The backward's three kernels, each walking one (tile, batch·head, segment) so no program holds a whole
`[K, V]` state: dq forward over K-tiles, dk backward over K-tiles (with the per-key gate gradient), dv backward
over V-tiles."""
from __future__ import annotations

import triton
import triton.language as tl

from longscan.kernels.linear_attention.triton.common import (DG_RUN, _chunk_decays, _chunk_keys, _chunk_scales,
                                                             _chunk_totals, _gate_chunk, _scores_rest,
                                                             _segment_program, _segment_state_tile, _state_dot,
                                                             _state_unit)


@triton.jit
def _bwd_dq_kernel(q, k, kd, eq, v, g, gg, do, h0, dq, gq, st, T, H, SEG, NC, scale,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                   HAS_H0: tl.constexpr, STORE_ST: tl.constexpr, NEED_DG: tl.constexpr, SF32: tl.constexpr,
                   PREC: tl.constexpr, SPREC: tl.constexpr, RESETS: tl.constexpr, SPLIT: tl.constexpr):
    """One (K-tile, batch·head, segment), walking forward from the state entering the segment (rows rk):
    dq = scale·(exp(b)⊙(do Sᵀ) + intra-chunk), and the q-side gate partial. Per key (GATE 3) the partial is
    written per key into gq; for scalar gates its sum over the tile goes to gq[..., ik]. With STORE_ST the
    last segment also writes the state after the last token, S_T (rows rk), to st: the host forms the
    final-state gate term Σ_v S_T⊙dht from it once dht is there (so dht is not needed before this kernel).

    Per key, q, kd, eq and g are _gate_operands_kernel's qd, kd, eq and chunk totals (k is not read: level 0's keys
    kn come from kd). The gate partials multiply by the same decayed operands (qd, kn, kd) that built the other
    side's terms, so that q⊙dq − k⊙dk cancels as it does in exact arithmetic. Level 0's keys kn = kd⊙e0 scale the
    dot's columns, so e0 multiplies its float32 result (kn is not formed: rounding e0 and kn to bf16 were two of
    dq's roundings), and the dk kernel's k-side partial takes kn as kd⊙e0 in float32 too.
    SPLIT (gated kinds, bf16/fp16 inputs): the intra-chunk dot takes the causal scores as two halves in q's dtype
    (hi + lo, _scores_rest), so dq misses only ~2^-16 of them; the gate partials keep hi alone, as the dk kernel
    rounds them (plan._split_scores says where the dispatch sets it). RESETS: g (GATE 2) may hold −inf, as in
    _fwd_kernel."""
    ik, nk, bh, js, ns, b, h = _segment_program(H)
    dt = q.dtype.element_ty
    rk = ik * BK + tl.arange(0, BK)
    rv = tl.arange(0, V)
    rc = tl.arange(0, C)
    causal = rc[:, None] >= rc[None, :]
    t_start = js * SEG
    t_end = tl.minimum(t_start + SEG, T)
    S = tl.zeros([BK, V], dtype=tl.float32)
    if HAS_H0:
        S += _segment_state_tile(h0, bh, js, ns, rk, rv, K, V)
    gamma = 0.0
    if GATE == 1:
        gamma = tl.load(gg + h).to(tl.float32)
    for t0 in range(t_start, t_end, C):
        t = t0 + rc
        m = t < t_end
        row = (b * T + t).to(tl.int64) * H + h
        if GATE == 3:
            bl = _chunk_totals(g, bh, t0, NC, rk, K, C)
            bkd = tl.load(kd + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
        else:
            bk, bkd = _chunk_keys(k, kd, g, row, m, bh, t0, NC, rk, K, C, GATE)
        bv = tl.load(v + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        bdo = tl.load(do + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        dA = tl.dot(bdo, tl.trans(bv), input_precision=PREC)        # [C(t), C(s)] = do_t·v_s
        inter = _state_dot(bdo, S, dt, SF32, SPREC)                  # [C, BK] = do_t Sᵀ
        if GATE == 0:
            acc = inter + tl.dot(tl.where(causal, dA, 0.0).to(dt), bk, input_precision=PREC)
            S += tl.dot(tl.trans(bk), bv, input_precision=PREC)
        elif GATE == 3:
            # dot(scores, kn) = dot(scores, kd)⊙e0: level 0's key scales applied in float32 (the docstring)
            e0 = _chunk_scales(g, bh, t0, NC, rk, K, C)
            x = inter + tl.dot(tl.where(causal, dA, 0.0).to(dt), bkd, input_precision=PREC) * e0[None, :]
            ptr = row[:, None] * K + rk[None, :]
            if NEED_DG:
                tl.store(gq + ptr, scale * tl.load(q + ptr, mask=m[:, None], other=0.0).to(tl.float32) * x,
                         mask=m[:, None])
            if SPLIT:
                x += tl.dot(_scores_rest(tl.where(causal, dA, 0.0), dt), bkd, input_precision=PREC) * e0[None, :]
            acc = x * tl.load(eq + ptr, mask=m[:, None], other=0.0).to(tl.float32)   # level 0's query factor exp(b)
            S = S * tl.exp(bl)[:, None] + tl.dot(tl.trans(bkd), bv, input_precision=PREC)
        else:
            bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
            gc = _gate_chunk(g, gamma, b, h, t, m, T, H, rk, K, GATE)
            if GATE == 2 and RESETS:
                # selecting only in the chunks that hold a reset (_chunk_decays)
                d, eqc, ekc, es = _chunk_decays(gc, causal, False)
                dA = tl.where(causal, dA * d, 0.0)
                intra = tl.dot(dA.to(dt), bk, input_precision=PREC)
            else:
                # finite gates, in the order of the kernels before resets (which they compile to, ptx_diff.py)
                bc, bl = tl.cumsum(gc, 0), tl.sum(gc, 0)
                dA = tl.where(causal, dA * tl.exp(bc[:, None] - bc[None, :]), 0.0)
                intra = tl.dot(dA.to(dt), bk, input_precision=PREC)
                eqc = tl.exp(bc)
            acc = inter * eqc[:, None] + intra
            if SPLIT:
                acc += tl.dot(_scores_rest(dA, dt), bk, input_precision=PREC)
            if NEED_DG:
                qd = (bq * eqc[:, None]).to(dt)
                part = tl.sum(qd.to(tl.float32) * inter + bq.to(tl.float32) * intra, 1)
                tl.store(gq + row * nk + ik, scale * part, mask=m)
            if GATE == 2 and RESETS:
                S = S * es + tl.dot(tl.trans((bk * ekc[:, None]).to(dt)), bv, input_precision=PREC)
            else:
                kd_ = (bk * tl.exp(bl - bc)[:, None]).to(dt)
                S = S * tl.exp(bl) + tl.dot(tl.trans(kd_), bv, input_precision=PREC)
        tl.store(dq + row[:, None] * K + rk[None, :], (acc * scale).to(dq.dtype.element_ty), mask=m[:, None])
    if STORE_ST:
        if js == ns - 1:
            tl.store(st + bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :], S)


@triton.jit
def _dg_suffix_sums(d, carry):
    """Per-key gate gradient, one chunk: d `[RUN, NR, BK]` (dL/dA of token RUN·r + a at [a, r]), carry `[BK]` the sum
    of dL/dA after the chunk -> (dg = carry + Σ_{t' ≥ t} dL/dA_t' per token, like d; each run's sum `[NR, BK]`).
    The run axis is in-thread, so only the run sums are summed across threads (tl.cumsum on the chunk's
    [C, BK] tile took a large share of the dk loop's instructions, most of them shuffles)."""
    tot = tl.sum(d, 0)
    after = tl.cumsum(tot, 0, reverse=True) - tot + carry[None, :]        # the sum after each run
    return tl.cumsum(d, 0, reverse=True) + after[None, :, :], tot


@triton.jit
def _bwd_dk_kernel(q, k, kd, ek, v, g, gg, do, dhe, hin, dk, gk, dg, term, dh0, T, H, SEG, NC, scale,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                   HAS_DHE: tl.constexpr, HAS_TERM: tl.constexpr, NEED_DG: tl.constexpr, SF32: tl.constexpr,
                   PREC: tl.constexpr, SPREC: tl.constexpr, RESETS: tl.constexpr):
    """One (K-tile, batch·head, segment), walking backward from the gradient of the state leaving the
    segment (rows rk): dk, the k-side gate partial, and segment 0's dh0 rows.

    Per key (GATE 3) it finishes the gate gradient in place: dg holds the q-side partial from the dq kernel;
    this kernel subtracts k⊙dk, leaving dL/dA, and writes dg = the reverse sum of dL/dA inside the chunk plus
    the carry (Σ of dL/dA after the chunk). The carry enters the segment as dg at the first token after it:
    Σ_v P ⊙ dhe (P the state entering the next segment, hin `[B·H, NS, K, V]`; dhe the gradient of the one leaving this segment, = exp(g_s)⊙dS_s;
    dL/dg_s = Σ_v exp(g_s)S_{s−1}⊙dS_s), so no segment waits for the sums of the later ones; the last segment
    starts from the final-state term. Scalar gates write their tile's k-side partial to gk[..., ik] (the host
    sums: a 1-D reverse cumulative sum in this kernel made the scalar-gate backward slower).
    Per key, q, kd, ek and g are _gate_operands_kernel's qd, kd, ek and chunk totals (k is not read).
    RESETS: g (GATE 2) may hold −inf, as in _fwd_kernel."""
    ik, nk, bh, js, ns, b, h = _segment_program(H)
    dt = q.dtype.element_ty
    rk = ik * BK + tl.arange(0, BK)
    rv = tl.arange(0, V)
    rc = tl.arange(0, C)
    causal_t = rc[:, None] <= rc[None, :]        # [C(s), C(t)]: t ≥ s
    t_start = js * SEG
    t_end = tl.minimum(t_start + SEG, T)
    nch = tl.cdiv(t_end - t_start, C)
    unit = _state_unit(scale, GATE)
    dH = tl.zeros([BK, V], dtype=tl.float32)
    if HAS_DHE:
        dH += _segment_state_tile(dhe, bh, js, ns, rk, rv, K, V) / unit
    carry = tl.zeros([BK], dtype=tl.float32)     # per key: Σ_{t' after this chunk} dL/dA_t' (see above)
    if GATE == 3 and NEED_DG:
        if js < ns - 1:
            carry += unit * tl.sum(_segment_state_tile(hin, bh, js + 1, ns, rk, rv, K, V) * dH, 1)
        elif HAS_TERM:
            carry += tl.load(term + bh.to(tl.int64) * K + rk)
    gamma = 0.0
    if GATE == 1:
        gamma = tl.load(gg + h).to(tl.float32)
    if GATE == 3:
        # The tile rows in run order: row i holds token RUN·(i mod NR) + i div NR, the order of the [RUN, NR, BK]
        # views below, so that the dots' [C, BK] results reshape into them (the dots do not mind the rows' order;
        # without dg too, so that dk is the same to the bit either way)
        NR: tl.constexpr = C // DG_RUN
        ra = tl.arange(0, DG_RUN)
        rr = tl.arange(0, NR)
        rc = DG_RUN * (rc % NR) + rc // NR
        causal_t = rc[:, None] <= rc[None, :]
    for i in range(0, nch):
        t0 = t_start + (nch - 1 - i) * C
        t = t0 + rc
        m = t < t_end
        row = (b * T + t).to(tl.int64) * H + h
        bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
        bv = tl.load(v + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        bdo = tl.load(do + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        dAt = tl.dot(bv, tl.trans(bdo), input_precision=PREC)       # [C(s), C(t)] = v_s·do_t
        inter = _state_dot(bv, dH, dt, SF32, SPREC)                  # [C, BK] = v_s dHᵀ (/ scale per key)
        if GATE == 0:
            acc = scale * tl.dot(tl.where(causal_t, dAt, 0.0).to(dt), bq, input_precision=PREC) + inter
            dH += scale * tl.dot(tl.trans(bq), bdo, input_precision=PREC)
        elif GATE == 3:
            # bq: qd, level 0's query side and the state gradient's
            intra = tl.dot(tl.where(causal_t, dAt, 0.0).to(dt), bq, input_precision=PREC)
            bl = _chunk_totals(g, bh, t0, NC, rk, K, C)
            if NEED_DG:
                # The elementwise work on [RUN, NR, BK] views (token RUN·r + a at [a, r]; 3-D loads and stores), so
                # that dL/dA arrives in the in-thread layout _dg_suffix_sums needs. kd is loaded beside ek (a load
                # is not moved above a store that may alias it), and dk is stored before the gate terms, with dL/dA
                # taken off the loaded partial one term at a time: the orders that kept this kernel under the
                # register limit. kn as the dq kernel takes it: kd⊙e0 in float32.
                t3 = t0 + DG_RUN * rr[None, :] + ra[:, None]
                m3 = (t3 < t_end)[:, :, None]
                p3 = ((b * T + t3).to(tl.int64) * H + h)[:, :, None] * K + rk[None, None, :]
                intra = tl.reshape(intra, [DG_RUN, NR, BK])
                inter = tl.reshape(inter, [DG_RUN, NR, BK])
                kdf = tl.load(ek + p3, mask=m3, other=0.0).to(tl.float32)
                bkd = tl.load(kd + p3, mask=m3, other=0.0)
                e0 = _chunk_scales(g, bh, t0, NC, rk, K, C)
                tl.store(dk + p3, (scale * (intra * (kdf * e0[None, None, :]) + inter * kdf)).to(dk.dtype.element_ty),
                         mask=m3)
                d = tl.load(dg + p3, mask=m3, other=0.0)   # the q-side partial, then dL/dA
                d -= scale * (bkd.to(tl.float32) * e0[None, None, :]) * intra   # kn as the dq kernel takes it
                d -= scale * bkd.to(tl.float32) * inter
                sums, runs = _dg_suffix_sums(d, carry)
                tl.store(dg + p3, sums, mask=m3)
                carry += tl.sum(runs, 0)   # (after the store: fewer spills than before it)
            else:
                ptr = row[:, None] * K + rk[None, :]
                kdf = tl.load(ek + ptr, mask=m[:, None], other=0.0).to(tl.float32)
                kf = kdf * _chunk_scales(g, bh, t0, NC, rk, K, C)[None, :]
                tl.store(dk + ptr, (scale * (intra * kf + inter * kdf)).to(dk.dtype.element_ty), mask=m[:, None])
            dH = dH * tl.exp(bl)[:, None] + tl.dot(tl.trans(bq), bdo, input_precision=PREC)
        else:
            bk = tl.load(k + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
            gc = _gate_chunk(g, gamma, b, h, t, m, T, H, rk, K, GATE)
            if GATE == 2 and RESETS:
                # selecting only in the chunks that hold a reset (_chunk_decays; [s, t]: exp(b_t − b_s))
                dec, eqc, ekc, es = _chunk_decays(gc, causal_t, True)
                intra = tl.dot(tl.where(causal_t, dAt * dec, 0.0).to(dt), bq, input_precision=PREC)
            else:
                # finite gates, in the order of the kernels before resets (which they compile to, ptx_diff.py)
                bc, bl = tl.cumsum(gc, 0), tl.sum(gc, 0)
                dec = tl.exp(bc[None, :] - bc[:, None])                   # [s, t]: exp(b_t − b_s)
                intra = tl.dot(tl.where(causal_t, dAt * dec, 0.0).to(dt), bq, input_precision=PREC)
                ekc = tl.exp(bl - bc)
            acc = scale * intra + inter * ekc[:, None]
            if NEED_DG:
                kd_ = (bk * ekc[:, None]).to(dt).to(tl.float32)
                part = tl.sum(scale * bk.to(tl.float32) * intra + kd_ * inter, 1)
                tl.store(gk + row * nk + ik, part, mask=m)
            if GATE == 2 and RESETS:
                qd = (bq * eqc[:, None]).to(dt)
                dH = dH * es + scale * tl.dot(tl.trans(qd), bdo, input_precision=PREC)
            else:
                qd = (bq * tl.exp(bc)[:, None]).to(dt)
                dH = dH * tl.exp(bl) + scale * tl.dot(tl.trans(qd), bdo, input_precision=PREC)
        if GATE != 3:   # (per key: stored above)
            tl.store(dk + row[:, None] * K + rk[None, :], acc.to(dk.dtype.element_ty), mask=m[:, None])
    if js == 0:
        tl.store(dh0 + bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :], dH * unit)


@triton.jit
def _bwd_dv_kernel(q, k, kd, g, gg, do, dhe, dv, T, H, SEG, NC, scale,
                   K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                   HAS_DHE: tl.constexpr, PREC: tl.constexpr, RESETS: tl.constexpr):
    """One (V-tile, batch·head, segment), walking backward from the gradient of the state leaving the
    segment (columns rv): dv = (k⊙exp(b_C − b)) dH + scale·Aᵀ do, A the decayed causal q·k scores.
    Per key, q, kd and g are _gate_operands_kernel's qd, kd and chunk totals (k is not read: level 0's keys come
    from kd). RESETS: g (GATE 2) may hold −inf, as in _fwd_kernel."""
    iv, _, bh, js, ns, b, h = _segment_program(H)
    dt = q.dtype.element_ty
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    causal_t = rc[:, None] <= rc[None, :]        # [C(s), C(t)]: t ≥ s
    t_start = js * SEG
    t_end = tl.minimum(t_start + SEG, T)
    nch = tl.cdiv(t_end - t_start, C)
    unit = _state_unit(scale, GATE)
    dH = tl.zeros([K, BV], dtype=tl.float32)
    if HAS_DHE:
        dH += _segment_state_tile(dhe, bh, js, ns, rk, rv, K, V) / unit
    gamma = 0.0
    if GATE == 1:
        gamma = tl.load(gg + h).to(tl.float32)
    for i in range(0, nch):
        t0 = t_start + (nch - 1 - i) * C
        t = t0 + rc
        m = t < t_end
        row = (b * T + t).to(tl.int64) * H + h
        bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
        if GATE == 3:
            bl = _chunk_totals(g, bh, t0, NC, rk, K, C)
        bk, bkd = _chunk_keys(k, kd, g, row, m, bh, t0, NC, rk, K, C, GATE)
        bdo = tl.load(do + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        if GATE == 3:
            # dH / scale: both updates are dots accumulating in place; dv = scale·(kd dH' + Aᵀ do), A = kn·qdᵀ
            At = tl.where(causal_t, tl.dot(bk, tl.trans(bq), input_precision=PREC), 0.0)
            acc = tl.dot(bkd, dH.to(dt), input_precision=PREC)
            acc = scale * tl.dot(At.to(dt), bdo, acc, input_precision=PREC)
            dH = dH * tl.exp(bl)[:, None] + tl.dot(tl.trans(bq), bdo, input_precision=PREC)
        else:
            if GATE == 0:
                At = tl.where(causal_t, tl.dot(bk, tl.trans(bq), input_precision=PREC), 0.0)
                acc = tl.dot(bk, dH.to(dt), input_precision=PREC)
                qd = bq
            else:
                gc = _gate_chunk(g, gamma, b, h, t, m, T, H, rk, K, GATE)
                if GATE == 2 and RESETS:
                    # selecting only in the chunks that hold a reset (_chunk_decays)
                    dec, eqc, ekc, es = _chunk_decays(gc, causal_t, True)
                    At = tl.where(causal_t, tl.dot(bk, tl.trans(bq), input_precision=PREC) * dec, 0.0)
                    acc = tl.dot((bk * ekc[:, None]).to(dt), dH.to(dt), input_precision=PREC)
                    qd = (bq * eqc[:, None]).to(dt)
                    dH = dH * es
                else:
                    # finite gates, in the order of the kernels before resets (which they compile to, ptx_diff.py)
                    bc, bl = tl.cumsum(gc, 0), tl.sum(gc, 0)
                    At = tl.where(causal_t, tl.dot(bk, tl.trans(bq), input_precision=PREC)
                                  * tl.exp(bc[None, :] - bc[:, None]), 0.0)
                    kd_ = (bk * tl.exp(bl - bc)[:, None]).to(dt)
                    acc = tl.dot(kd_, dH.to(dt), input_precision=PREC)
                    qd = (bq * tl.exp(bc)[:, None]).to(dt)
                    dH = dH * tl.exp(bl)
            acc += scale * tl.dot(At.to(dt), bdo, input_precision=PREC)
            dH += scale * tl.dot(tl.trans(qd), bdo, input_precision=PREC)
        tl.store(dv + row[:, None] * V + rv[None, :], acc.to(dv.dtype.element_ty), mask=m[:, None])



def run_dq(*, qx, kx, kdx, eqx, v, gx, gg, do, h0, dq, gq, st, T, H, seg, ns, NC, scale, BK, need_dg, sf32, sprec,
           split, dummy, common, cfg):
    """Launch _bwd_dq_kernel over (K-tiles, batch·heads, segments); split: the intra-chunk scores as two halves
    (the kernel's SPLIT)."""
    B_H = dq.shape[0] * H
    nk = qx.shape[-1] // BK
    _bwd_dq_kernel[(nk, B_H, ns)](qx, kx, kdx, eqx, v, gx, gg, do, h0 if h0 is not None else dummy, dq,
                                  gq if gq is not None else dummy, st if st is not None else dummy,
                                  T, H, seg, NC, scale,
                                  BK=BK, HAS_H0=h0 is not None, STORE_ST=st is not None, NEED_DG=need_dg,
                                  SF32=sf32, SPREC=sprec, SPLIT=split, **common, **cfg)


def run_dk(*, qx, kx, kdx, ekx, v, gx, gg, do, dhe, hin, dk, gk, dg, term, dh0, T, H, seg, ns, NC, scale, BK,
           need_dg, sf32, sprec, dummy, common, cfg):
    """Launch _bwd_dk_kernel over (K-tiles, batch·heads, segments); hin: the segments' entering states (several
    segments), dg: the per-key gate gradient it finishes in place (or None)."""
    B_H = dk.shape[0] * H
    K = qx.shape[-1]
    _bwd_dk_kernel[(K // BK, B_H, ns)](qx, kx, kdx, ekx, v, gx, gg, do, dhe if dhe is not None else dummy,
                                       hin if hin is not None else dummy, dk, gk if gk is not None else dummy,
                                       dg if dg is not None else dummy,
                                       term if term is not None else dummy,
                                       dh0, T, H, seg, NC, scale, BK=BK, HAS_DHE=dhe is not None,
                                       HAS_TERM=term is not None, NEED_DG=need_dg, SF32=sf32,
                                       SPREC=sprec, **common, **cfg)


def run_dv(*, qx, kx, kdx, gx, gg, do, dhe, dv, T, H, seg, ns, NC, scale, BV, dummy, common, cfg):
    """Launch _bwd_dv_kernel over (V-tiles, batch·heads, segments)."""
    B_H = dv.shape[0] * H
    V = dv.shape[-1]
    _bwd_dv_kernel[(V // BV, B_H, ns)](qx, kx, kdx, gx, gg, do, dhe if dhe is not None else dummy, dv, T, H,
                                       seg, NC, scale, BV=BV, HAS_DHE=dhe is not None, **common, **cfg)
