"""Per-key gates that fall steeply or reset (−inf) inside a chunk: the exact terms the main kernels' level-0 factor
leaves out (the package docstring), added after them."""
from __future__ import annotations

import triton
import triton.language as tl

from longscan.kernels.linear_attention.triton.common import LEVEL_SPAN, _gate_chunk, _key_cumulative, _level0_factor
from longscan.kernels.linear_attention.triton.records import _GateOperands


@triton.jit
def _next_level(bc, nc, c, j):
    """With resets: the next level per key `[K]` -> (its reference c, its reset span j): the largest b of span j
    at or below c − LEVEL_SPAN, else the next span's largest b (its first token's), −1e30 (an empty level) where
    that span is empty too. (Spans: the tokens between resets, nc the reset counts of _key_cumulative.)"""
    lower = tl.max(tl.where((nc == j[None, :]) & (bc <= c[None, :] - LEVEL_SPAN), bc, -1e30), 0)
    move = lower == -1e30
    first = tl.max(tl.where(nc == j[None, :] + 1, bc, -1e30), 0)
    return tl.where(move, first, lower), tl.where(move, j + 1, j)


@triton.jit
def _level_factors(bc, nc, bl, nl, c, j, first):
    """With resets: (query factor, key factor) `[C, K]` of one step of _levels_kernel: the level with reference c
    in reset span j, exp(b − c) (≤ 1 where it pairs) on span j's tokens and exp(c − b) < exp(LEVEL_SPAN) on the
    level's (b in (c − LEVEL_SPAN, c] of span j), 0 elsewhere, so no pair across a reset. first (span 0, c = 0:
    level 0): less the main kernels' key factor kf, which they gave the keys without a reset in the chunk (those
    with one got level-0 scores of 0: the pre-pass's note), so that their part is taken back."""
    same = nc == j[None, :]
    qf = tl.where(same, tl.exp(tl.minimum(bc - c[None, :], 0.0)), 0.0)
    inside = same & (bc <= c[None, :]) & (bc > c[None, :] - LEVEL_SPAN)
    kf = tl.where(inside, tl.exp(tl.minimum(c[None, :] - bc, LEVEL_SPAN)), 0.0)
    if first:
        kf -= tl.where(nl[None, :] == 0, _level0_factor(bc, bl), 0.0)
    return qf, kf


@triton.jit
def _next_finite_level(bc, c):
    """Finite gates: the next level's reference per key `[K]`: the largest b at or below c − LEVEL_SPAN, −1e30
    (an empty level) where there is none."""
    return tl.max(tl.where(bc <= c[None, :] - LEVEL_SPAN, bc, -1e30), 0)


@triton.jit
def _finite_level_factors(bc, bl, c, first):
    """Finite gates: (query factor, key factor) `[C, K]` of one step of _levels_kernel. first: level 0 made
    exact, (exp(b), exp(−b) on b > −LEVEL_SPAN, 0 below, less the main kernels' kf): what they gave a steep key
    taken back. Else the level with reference c: exp(b − c) (≤ 1 where it pairs) and exp(c − b) < exp(LEVEL_SPAN)
    on the level's tokens (b in (c − LEVEL_SPAN, c]), 0 elsewhere."""
    if first:
        qf = tl.exp(bc)
        kf = tl.where(bc <= -LEVEL_SPAN, 0.0, tl.exp(tl.minimum(-bc, LEVEL_SPAN))) - _level0_factor(bc, bl)
    else:
        qf = tl.exp(tl.minimum(bc - c[None, :], 0.0))
        inside = (bc <= c[None, :]) & (bc > c[None, :] - LEVEL_SPAN)
        kf = tl.where(inside, tl.exp(tl.minimum(c[None, :] - bc, LEVEL_SPAN)), 0.0)
    return qf, kf


@triton.jit
def _level_step(bc, nc, bl, nl, c, j, it, RESETS: tl.constexpr):
    """Step it of _levels_kernel: -> (its reference c, its span j, query factor, key factor); step 0 is level 0
    with the main kernels' part taken back. Without RESETS (finite gates) one span: j is left as it is."""
    if RESETS:
        if it > 0:
            c, j = _next_level(bc, nc, c, j)
        qf, kf = _level_factors(bc, nc, bl, nl, c, j, it == 0)
    else:
        if it > 0:
            c = _next_finite_level(bc, c)
        qf, kf = _finite_level_factors(bc, bl, c, it == 0)
    return c, j, qf, kf


@triton.jit
def _chunk_levels(q, k, v, do, o, dq, dk, dv, gq, row, m, bc, nc, bl, nl, scale, rk, rv, rc, causal,
                  K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, MODE: tl.constexpr, NEED_DG: tl.constexpr,
                  PREC: tl.constexpr, RESETS: tl.constexpr):
    """One chunk of _levels_kernel (token rows row, mask m; its cumulative gates bc and totals bl, with RESETS
    their reset counts nc and nl, else 0): its levels' terms added into MODE's outputs."""
    dt = q.dtype.element_ty
    bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
    bk = tl.load(k + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
    bv = tl.load(v + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
    # step 0 takes level 0's held part back; the levels after a span's first have their references LEVEL_SPAN
    # apart, and the spans' falls add up to −min(b), a bound on their number (a for loop, not a while: Triton
    # 3.6 failed to compile a dot accumulated in a while loop here)
    if RESETS:
        steps = tl.minimum(-tl.min(bc) / LEVEL_SPAN + tl.max(nl), C).to(tl.int32) + 1
    else:
        steps = tl.minimum(-tl.min(bc) / LEVEL_SPAN, C).to(tl.int32) + 1
    c = tl.zeros([K], dtype=tl.float32)
    j = tl.zeros([K], dtype=tl.int32)
    if MODE == 0:
        A = tl.zeros([C, C], dtype=tl.float32)
        for it in range(0, steps):
            c, j, qf, kf = _level_step(bc, nc, bl, nl, c, j, it, RESETS)
            A += tl.dot((bq * qf).to(dt), tl.trans((bk * kf).to(dt)), input_precision=PREC)
        ptr = o + row[:, None] * V + rv[None, :]
        add = tl.dot(tl.where(causal, A, 0.0).to(dt), bv, input_precision=PREC)
        tl.store(ptr, tl.load(ptr, mask=m[:, None]).to(tl.float32) + scale * add, mask=m[:, None])
    else:
        bdo = tl.load(do + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        dAm = tl.where(causal, tl.dot(bdo, tl.trans(bv), input_precision=PREC), 0.0).to(dt)
        ptr = row[:, None] * K + rk[None, :]
        if MODE == 1:
            addq = tl.zeros([C, K], dtype=tl.float32)
            part = tl.zeros([C, K], dtype=tl.float32)
            for it in range(0, steps):
                c, j, qf, kf = _level_step(bc, nc, bl, nl, c, j, it, RESETS)
                qd = (bq * qf).to(dt)
                kn = (bk * kf).to(dt)
                intra = tl.dot(dAm, kn, input_precision=PREC)
                addq += intra * qf
                if NEED_DG:   # q⊙dq − k⊙dk with the operands the dots used (see the dq kernel)
                    part += (qd.to(tl.float32) * intra
                             - kn.to(tl.float32) * tl.dot(tl.trans(dAm), qd, input_precision=PREC))
            tl.store(dq + ptr, tl.load(dq + ptr, mask=m[:, None]).to(tl.float32) + scale * addq, mask=m[:, None])
            if NEED_DG:
                tl.store(gq + ptr, tl.load(gq + ptr, mask=m[:, None]) + scale * part, mask=m[:, None])
        else:
            addk = tl.zeros([C, K], dtype=tl.float32)
            At = tl.zeros([C, C], dtype=tl.float32)
            for it in range(0, steps):
                c, j, qf, kf = _level_step(bc, nc, bl, nl, c, j, it, RESETS)
                qd = (bq * qf).to(dt)
                addk += tl.dot(tl.trans(dAm), qd, input_precision=PREC) * kf
                At += tl.dot((bk * kf).to(dt), tl.trans(qd), input_precision=PREC)
            tl.store(dk + ptr, tl.load(dk + ptr, mask=m[:, None]).to(tl.float32) + scale * addk, mask=m[:, None])
            causal_t = rc[:, None] <= rc[None, :]        # [C(s), C(t)]: t ≥ s
            addv = tl.dot(tl.where(causal_t, At, 0.0).to(dt), bdo, input_precision=PREC)
            vptr = dv + row[:, None] * V + rv[None, :]
            tl.store(vptr, tl.load(vptr, mask=m[:, None]).to(tl.float32) + scale * addv, mask=m[:, None])


@triton.jit
def _levels_kernel(q, k, v, g, do, o, dq, dk, dv, gq, steep, steep_chunks, T, H, SEG, scale,
                   K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, MODE: tl.constexpr, NEED_DG: tl.constexpr,
                   PREC: tl.constexpr, RESETS: tl.constexpr):
    """Per-key gates: for every chunk where a key's gate falls to −LEVEL_SPAN (or, with RESETS, resets), the
    exact terms of its tokens below that (or after a reset), less what the main kernels' held key factor gave
    them (see the module docstring; per reset span, _level_factors), added to what the main kernels wrote.
    (They do not loop over levels themselves: a loop nested in their chunk loop stops Triton from pipelining
    its loads.) One program: one (batch·head, segment), whole K and V; a segment the pre-pass did not mark in
    steep `[B·H, NS]` costs one load. With RESETS a chunk it did not mark in steep_chunks `[B·H, NC]` costs one
    more (its gates are not read); without (finite gates; steep_chunks is None) the kernel reads every chunk's
    gates of a marked segment and visits those that fall that far. MODE 0, after the forward: o. MODE 1, after
    the dq kernel and before the dk kernel (which finishes the gate gradient): dq and, when NEED_DG, both sides'
    gate partials into gq. MODE 2, after the dk and dv kernels: dk and dv."""
    bh = tl.program_id(0)
    js = tl.program_id(1)
    ns = tl.num_programs(1)
    b = bh // H
    h = bh % H
    if tl.load(steep + (bh * ns + js).to(tl.int64)) > 0:
        rk = tl.arange(0, K)
        rv = tl.arange(0, V)
        rc = tl.arange(0, C)
        causal = rc[:, None] >= rc[None, :]
        t_start = js * SEG
        t_end = tl.minimum(t_start + SEG, T)
        if RESETS:
            NC = tl.cdiv(T, C)
            for t0 in range(t_start, t_end, C):
                if tl.load(steep_chunks + (bh * NC + t0 // C).to(tl.int64)) > 0:
                    t = t0 + rc
                    m = t < t_end
                    row = (b * T + t).to(tl.int64) * H + h
                    gc = _gate_chunk(g, 0.0, b, h, t, m, T, H, rk, K, 3)
                    bc, nc, bl, nl = _key_cumulative(gc)
                    _chunk_levels(q, k, v, do, o, dq, dk, dv, gq, row, m, bc, nc, bl, nl, scale, rk, rv, rc, causal,
                                  K, V, C, MODE, NEED_DG, PREC, RESETS)
        else:
            for t0 in range(t_start, t_end, C):
                t = t0 + rc
                m = t < t_end
                row = (b * T + t).to(tl.int64) * H + h
                gc = _gate_chunk(g, 0.0, b, h, t, m, T, H, rk, K, 3)
                bc = tl.cumsum(gc, 0)
                bl = tl.sum(gc, 0)
                if tl.min(bc) <= -LEVEL_SPAN:
                    _chunk_levels(q, k, v, do, o, dq, dk, dv, gq, row, m, bc, 0, bl, 0, scale, rk, rv, rc, causal,
                                  K, V, C, MODE, NEED_DG, PREC, RESETS)


def _add_levels(mode, ops: _GateOperands, seg, C, q, k, v, g, scale, prec, do=None, o=None, dq=None, gq=None,
                dk=None, dv=None, need_dg=False):
    """Launch _levels_kernel (MODE mode) over the segments the pre-pass marked (ops.steep) and, where it marked
    chunks too (ops.steep_chunks: g may hold resets), those chunks only; it adds into the given outputs."""
    B, T, H, K = q.shape
    a = [x if x is not None else q for x in (do, o, dq, dk, dv, gq)]
    # without resets steep_chunks is None, a constexpr: the kernel then has no such argument
    _levels_kernel[(B * H, ops.steep.shape[1])](q, k, v, g, *a, ops.steep, ops.steep_chunks, T, H, seg, scale,
                                                K=K, V=v.shape[-1], C=C, MODE=mode, NEED_DG=need_dg,
                                                PREC=prec, RESETS=ops.steep_chunks is not None, num_warps=8)

