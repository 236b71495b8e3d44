"""Chunked linear attention in Triton: the GPU backend of the local-compute contract (DESIGN.md).

Lightning Attention-2 split: inside a chunk of C tokens attention is quadratic (masked, decay-weighted);
across chunks a float32 state `[K, V]` carried in registers holds the past. One program walks the chunks
of one (batch, head, V-tile) in order, so there is no `[N, K, V]` state tensor in memory.

Long single sequences have few (batch, head) pairs to keep the GPU busy, so the chunks are cut into
NS segments and run in parallel with the same segment-prefix scan that SP uses across GPUs:
  1. `_state_kernel`: every segment's state from zero and its total log decay       (the SP "S_loc, Γ")
  2. `_scan_kernel`:  the prefix entering each segment, P_{j+1} = exp(Γ_j) ⊙ P_j + S_j  (the SP scan)
  3. the main kernel runs every segment from its prefix.
Backward mirrors it with three kernels, each tiled so no program holds a whole `[K, V]` state: dq walks
forward from the prefixes over K-tiles; dk (K-tiles) and dv (V-tiles) walk backward from the reverse prefixes
of the state gradient (built from `prefix_grad` pieces). The per-segment states are a `SegmentStates`
value that one entry point hands the next (SP's state pass → its output pass, `prefix_grad` → the backward,
the forward → the backward: the prefixes it scanned), so those state passes and scans are not repeated.
(SP's backward recomputes the forward's (k, v) states rather than hold them through the step: they would
add a state per segment to its memory.)

Decay kinds (log space, ≤ 0), as a constexpr GATE: 0 none, 1 g_gamma `[H]`, 2 g `[B, T, H]`,
3 g `[B, T, H, K]`. Per-key gates factor the decay inside a chunk, exp(b_t − b_s) = exp(b_t − c)·exp(c − b_s)
(b the chunk-local cumulative gate, c a reference per key), so the scores are matmuls. A pre-pass,
`_gate_operands_kernel`, writes the decayed operands once per call: qd = q⊙exp(b) and kd = k⊙exp(b_C − b)
(b_C the chunk total), the chunk totals, and for the backward the factors exp(b) (dq's) and exp(b_C − b) (dk's),
in q's dtype. The key side of the scores, kn = k⊙exp(−b), is kd times a per-key scale exp(−b_C), so the main
kernels build it from kd as they load it (_level0_keys) and it is neither written nor read (a pass over q's size
fewer in the pre-pass and in each main kernel). A forward that a backward follows keeps them all (options.keep_gate_operands),
so the backward runs no pre-pass of its own; in SP the state pass's kd goes on to the output pass. The main kernels
then read them as the no-decay kernels read q and k, with no `[C, K]` gate tile, cumulative sum or exps of
their own: that kept their chunks at 32 tokens, where Triton's dots compile to mma.sync instead of Hopper's
wgmma (benchmarks/RESULTS.md). The scale is exp(min(−b_C, LEVEL_SPAN)) (c = 0, level 0): exact while the chunk
total stays above −LEVEL_SPAN, which is every chunk of ordinary gates. The pre-pass marks the segments where a
key's gate falls further inside a chunk, and `_levels_kernel` then adds, for those chunks, the exact terms:
level 0 on the tokens above −LEVEL_SPAN and levels with reference c = the largest b not yet taken, each a matmul
over the tokens in (c − LEVEL_SPAN, c], minus what the main kernels' factor gave that key (`_level0_factor`: on a
key that steep, exp(LEVEL_SPAN − (b − b_C)), taken back whole). Every factor stays within [−exp(LEVEL_SPAN),
exp(LEVEL_SPAN)], so no gate overflows: a steep fall costs matmuls, not correctness (a single factorisation,
exp(b_t)·exp(−b_s), gave NaN once a chunk's gates summed below about −88). Log gates must be finite and ≤ 0
(DESIGN's decays).

Gradient of the gate (A_t the cumulative log gate): dL/dA_t = q_t⊙dq_t − k_t⊙dk_t, plus Σ_v S_T⊙dS_T at the
last step; dg_s = Σ_{t≥s} dL/dA_t. The dq and dk kernels emit the q and k sides. Scalar gates: the host sums
them. Per-key gates: the dk kernel, walking backward, carries the sums across chunks and takes them inside
each chunk (a reverse sum over the chunk's tile, its rows held in runs of DG_RUN consecutive tokens a thread so
that the sum is mostly adds in registers: _dg_suffix_sums); across segments the dk kernel needs no other
segment's sums, since dg at a segment's first token is also Σ_v exp(g_s)S_{s−1}⊙dS_s, a product of the prefix state and the state gradient
that the backward already holds.

Shapes: q, k `[B, T, H, K]`, v `[B, T, H, V]`; states `[B, H, K, V]` float32. K, V ∈ {16, 32, 64, 128}.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from longscan.kernels import trace
from longscan.kernels.linear_attention.options import LinearKernelOptions, resolve

# Per-key gates: one level of the intra-chunk factorisation spans this much log decay (module docstring).
# exp(60) is far inside float32/bf16 range, and a query factor that underflows (exp(b − c) < exp(−87)) drops
# terms below exp(60 − 87) ≈ 2e-12 of the others.
LEVEL_SPAN = tl.constexpr(60.0)
# Per-key dk kernel: the gate gradient's in-chunk reverse sum runs over [RUN, C / RUN, BK] views of its tiles, RUN
# consecutive tokens along the first axis, which Triton 3.6 keeps inside one thread (_dg_suffix_sums).
DG_RUN = tl.constexpr(4)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DIMS = (16, 32, 64, 128)
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------

@triton.jit
def _gate_chunk(g, gamma, b, h, t, m, T, H, rk, K: tl.constexpr, GATE: tl.constexpr):
    """Per-token log gates of one chunk as `[C]` (scalar kinds) or `[C, len(rk)]` (per-key, the keys rk);
    0 past the end. (Scalar kinds stay 1-D: size-1 dimensions broke Triton 3.6's LLVM lowering on Hopper.)"""
    if GATE == 1:
        gc = tl.where(m, gamma, 0.0)
    elif GATE == 2:
        gc = tl.load(g + (b * T + t).to(tl.int64) * H + h, mask=m, other=0.0).to(tl.float32)
    else:
        gc = tl.load(g + ((b * T + t).to(tl.int64) * H + h)[:, None] * K + rk[None, :],
                     mask=m[:, None], other=0.0).to(tl.float32)
    return gc


@triton.jit
def _level0_scale(bl):
    """Per key `[BK]` from the chunk totals b_C = bl: exp(min(−b_C, LEVEL_SPAN)), which takes the state's key factor
    kd = exp(b_C − b) to level 0's kf (_level0_factor)."""
    return tl.exp(tl.minimum(-bl, LEVEL_SPAN))


@triton.jit
def _level0_factor(bc, bl):
    """Level 0's key factor kf `[C, BK]` = exp(b_C − b)·exp(min(−b_C, LEVEL_SPAN)) (b_C = bl the chunk's total). On a
    key whose chunk total stays above −LEVEL_SPAN (every chunk of ordinary gates) kf = exp(−b), exact. On a steeper
    key kf = exp(LEVEL_SPAN − (b − b_C)) ≤ exp(LEVEL_SPAN): bounded and continuous in (b, b_C), and _levels_kernel
    takes it back whole and adds the exact levels. (Continuous: kernels whose b differ in rounding agree to
    rounding.) kf is the state's factor kd = exp(b_C − b) times a per-key scale, so the main kernels build their
    level-0 keys from the pre-pass's kd (_level0_keys) and no kn = k⊙kf is stored."""
    return tl.exp(bl[None, :] - bc) * _level0_scale(bl)[None, :]


@triton.jit
def _level0_keys(bkd, e0, dt: tl.constexpr):
    """Level 0's keys kn = k⊙kf `[C, BK]` in dtype dt from the pre-pass's kd = k⊙exp(b_C − b) (bkd, in dt) and the
    chunk's level-0 scales e0 `[BK]` (_chunk_scales), multiplied in dt (bf16: packed pairs, no conversions; the
    scale rounded to dt costs 2^-9 relative per key, as rounding kn did). Every main kernel rounds them the same
    way, so the gate partials of the dq and dk kernels multiply by the very keys that built the other side's
    terms (the dq kernel's docstring)."""
    return bkd * e0.to(dt)[None, :]


@triton.jit
def _chunk_keys(k, kd, g, row, m, bh, t0, NC, rk, K: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr):
    """The keys `[C, len(rk)]` a main kernel's scores take for one chunk (token rows row, mask m) -> (keys, kd): per
    key (GATE 3) level 0's keys built from the pre-pass's kd (g: its chunk totals and scales), and that kd; else k,
    twice. (The addresses as pointer + row offsets + key offsets: a 64-bit `[C, K]` offset tile first cost the dq
    kernel 8 instructions a chunk and 8 bytes of spills.)"""
    if GATE == 3:
        bkd = tl.load(kd + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
        bk = _level0_keys(bkd, _chunk_scales(g, bh, t0, NC, rk, K, C), kd.dtype.element_ty)
    else:
        bk = tl.load(k + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
        bkd = bk
    return bk, bkd


@triton.jit
def _next_level(bc, c):
    """The next level's reference per key `[K]`: the largest b at or below c − LEVEL_SPAN, −1e30 (an empty
    level) where there is none."""
    return tl.max(tl.where(bc <= c[None, :] - LEVEL_SPAN, bc, -1e30), 0)


@triton.jit
def _level_factors(bc, bl, c, first):
    """(query factor, key factor) `[C, K]` of one step of _levels_kernel. first: level 0 made exact, (exp(b),
    exp(−b) on b > −LEVEL_SPAN, 0 below, less the main kernels' kf): what they gave a steep key taken back. Else the level
    with reference c: exp(b − c) (≤ 1 where it pairs) and exp(c − b) < exp(LEVEL_SPAN) on the level's tokens
    (b in (c − LEVEL_SPAN, c]), 0 elsewhere."""
    if first:
        qf = tl.exp(bc)
        kf = tl.where(bc <= -LEVEL_SPAN, 0.0, tl.exp(tl.minimum(-bc, LEVEL_SPAN))) - _level0_factor(bc, bl)
    else:
        qf = tl.exp(tl.minimum(bc - c[None, :], 0.0))
        inside = (bc <= c[None, :]) & (bc > c[None, :] - LEVEL_SPAN)
        kf = tl.where(inside, tl.exp(tl.minimum(c[None, :] - bc, LEVEL_SPAN)), 0.0)
    return qf, kf


@triton.jit
def _level_step(bc, bl, c, it):
    """Step it of _levels_kernel: -> (its reference c, query factor, key factor); step 0 is the held part."""
    if it > 0:
        c = _next_level(bc, c)
    qf, kf = _level_factors(bc, bl, c, it == 0)
    return c, qf, kf


@triton.jit
def _segment_state_tile(ptr, bh, js, ns, rk, rv, K: tl.constexpr, V: tl.constexpr):
    """Rows rk, columns rv of state [bh, js] of a `[B·H, NS, K, V]` float32 tensor (a segment's entering
    state, or the gradient of its leaving state)."""
    return tl.load(ptr + (bh * ns + js).to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]).to(tl.float32)


@triton.jit
def _fwd_kernel(q, k, kd, v, g, gg, o, h0, ht, T, H, SEG, NC, scale,
                K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr):
    """One (V-tile, batch·head, segment): o for the segment's tokens, starting from state h0[bh, seg].
    Per-key gates (GATE 3) read _gate_operands_kernel's outputs: q and kd are qd and kd, g the chunk totals (k is
    not read: level 0's keys come from kd)."""
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    js = tl.program_id(2)
    ns = tl.num_programs(2)
    b = bh // H
    h = bh % H
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
            bt = tl.cumsum(gc, 0)          # chunk-local cumulative log gate [C]
            blt = tl.sum(gc, 0)            # the chunk's total
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
def _gate_operands_kernel(q, k, g, qd, kd, eq, ek, gl, steep, T, H, NC, SEG,
                          K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, HAS_Q: tl.constexpr,
                          STORE_KD: tl.constexpr, STORE_F: tl.constexpr):
    """Per-key gates, one (chunk, batch·head, K-tile): the decayed operands every per-key kernel reads in place
    of g, so none of them holds a `[C, K]` gate tile, its cumulative sum or its exps (those cost half the per-key
    forward and kept its chunks at 32 tokens, where Triton compiles the dots to mma.sync rather than wgmma).
    Writes, in q's layout and dtype, with b the chunk-local inclusive cumulative gate: qd = q⊙exp(b) (with HAS_Q)
    and kd = k⊙exp(b_C − b) (with STORE_KD; the main kernels build level 0's keys from it, _level0_keys); with
    STORE_F the factors themselves, eq = exp(b) and ek = exp(b_C − b) (the backward's output factors, dq's and
    dk's); gl `[B·H, NC, 2, K]` float32, the chunk totals b_C and level 0's key scales exp(min(−b_C, LEVEL_SPAN))
    (_level0_keys); and marks the chunk's segment in steep `[B·H, NS]` when a key falls to −LEVEL_SPAN inside it
    (_levels_kernel then visits it)."""
    # One flat axis, K-tiles fastest, then batch·heads, then chunks: the programs that run together read whole
    # token rows of q, k and g (4 KB at 16 heads × 128 keys), not one head's slice of many rows (chunks fastest:
    # 631 µs against 553 at B=1, T=65536 on an H200, where a head's 1,024 chunks filled the GPU).
    nkt = K // BK
    BH = tl.num_programs(0) // (NC * nkt)
    pid = tl.program_id(0)
    n = pid // (BH * nkt)
    bh = (pid // nkt) % BH
    b = bh // H
    h = bh % H
    rk = (pid % nkt) * BK + tl.arange(0, BK)
    t = n * C + tl.arange(0, C)
    m = t < T
    gc = _gate_chunk(g, 0.0, b, h, t, m, T, H, rk, K, 3)   # 0 past the end
    bc = tl.cumsum(gc, 0)
    bl = tl.sum(gc, 0)
    ptr = ((b * T + t).to(tl.int64) * H + h)[:, None] * K + rk[None, :]
    if HAS_Q:
        bq = tl.load(q + ptr, mask=m[:, None], other=0.0)
        qf = tl.exp(bc)
        tl.store(qd + ptr, (bq * qf).to(qd.dtype.element_ty), mask=m[:, None])
        if STORE_F:
            tl.store(eq + ptr, qf.to(eq.dtype.element_ty), mask=m[:, None])
    kdf = tl.exp(bl[None, :] - bc)
    if STORE_KD:
        bk = tl.load(k + ptr, mask=m[:, None], other=0.0)
        tl.store(kd + ptr, (bk * kdf).to(kd.dtype.element_ty), mask=m[:, None])
    if STORE_F:
        tl.store(ek + ptr, kdf.to(ek.dtype.element_ty), mask=m[:, None])
    base = (bh * NC + n).to(tl.int64) * (2 * K)
    tl.store(gl + base + rk, bl)
    tl.store(gl + base + K + rk, _level0_scale(bl))
    if tl.min(bl) <= -LEVEL_SPAN:   # with log gates ≤ 0 a chunk's total is its lowest cumulative gate
        ns = tl.cdiv(T, SEG)
        tl.store(steep + (bh * ns + (n * C) // SEG).to(tl.int64), 1)


@triton.jit
def _chunk_totals(gl, bh, t0, NC, rk, K: tl.constexpr, C: tl.constexpr):
    """Per-key gates: the total log gate b_C `[K]` of the chunk starting at token t0 (gl of _gate_operands_kernel)."""
    return tl.load(gl + (bh * NC + t0 // C).to(tl.int64) * (2 * K) + rk)


@triton.jit
def _chunk_scales(gl, bh, t0, NC, rk, K: tl.constexpr, C: tl.constexpr):
    """Per-key gates: the level-0 scales exp(min(−b_C, LEVEL_SPAN)) `[K]` of the chunk starting at token t0 (gl of
    _gate_operands_kernel; loaded rather than computed: each thread of a main kernel holds many keys of a tile,
    and the exp, for each of them, cost the dv kernel about 170 instructions a chunk)."""
    return tl.load(gl + (bh * NC + t0 // C).to(tl.int64) * (2 * K) + K + rk)


@triton.jit
def _state_kernel(x, y, g, gg, out_s, out_a, T, H, SEG, NC, scale,
                  K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                  FROM_START: tl.constexpr, PREC: tl.constexpr):
    """Per segment: FROM_START=False: Σ_t exp(A_end - A_t) ⊙ x_t y_tᵀ (k, v: the segment's state from zero);
    FROM_START=True: scale·Σ_t exp(A_t) ⊙ x_t y_tᵀ (q, do: the gradient of the state entering it).
    A is the inclusive cumulative log gate from the segment start. Also writes the total A_end `[K]`.
    Per-key gates (GATE 3): x is _gate_operands_kernel's kd (k⊙exp(b_C − b)) or qd (q⊙exp(b)), g its chunk
    totals."""
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    js = tl.program_id(2)
    ns = tl.num_programs(2)
    b = bh // H
    h = bh % H
    dt = x.dtype.element_ty
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    t_start = js * SEG
    t_end = tl.minimum(t_start + SEG, T)
    S = tl.zeros([K, BV], dtype=tl.float32)
    aoff = tl.zeros([K], dtype=tl.float32)   # running total log gate (broadcast over K for scalar kinds)
    gamma = 0.0
    if GATE == 1:
        gamma = tl.load(gg + h).to(tl.float32)
    for t0 in range(t_start, t_end, C):
        t = t0 + rc
        m = t < t_end
        row = (b * T + t).to(tl.int64) * H + h
        bx = tl.load(x + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
        by = tl.load(y + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        if GATE == 0:
            S += tl.dot(tl.trans(bx), by, input_precision=PREC)
        elif GATE == 3:
            bl = _chunk_totals(g, bh, t0, NC, rk, K, C)
            if FROM_START:
                xd = (bx * tl.exp(aoff)[None, :]).to(dt)
                S += tl.dot(tl.trans(xd), by, input_precision=PREC)
            else:
                S = S * tl.exp(bl)[:, None] + tl.dot(tl.trans(bx), by, input_precision=PREC)
            aoff += bl
        else:
            gc = _gate_chunk(g, gamma, b, h, t, m, T, H, rk, K, GATE)
            bc = tl.cumsum(gc, 0)
            bl = tl.sum(gc, 0)
            if FROM_START:
                xd = (bx * tl.exp(aoff[None, :] + bc[:, None])).to(dt)
                S += tl.dot(tl.trans(xd), by, input_precision=PREC)
            else:
                xd = (bx * tl.exp(bl - bc)[:, None]).to(dt)
                S = S * tl.exp(bl) + tl.dot(tl.trans(xd), by, input_precision=PREC)
            aoff += bl
    if FROM_START:
        S = S * scale
    base = (bh * ns + js).to(tl.int64)
    tl.store(out_s + base * K * V + rk[:, None] * V + rv[None, :], S)
    if iv == 0:
        tl.store(out_a + base * K + rk, aoff)


@triton.jit
def _scan_kernel(s, a, init, out, final, NS, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, STORE_OUT: tl.constexpr):
    """Segment-prefix scan of one (batch·head, K-tile, V-tile): P ← exp(a_j) ⊙ P + s_j over segments j (in
    reverse if REVERSE). out[j] = P before segment j (the state entering it, or for REVERSE the gradient
    leaving it). A chain of NS dependent steps: small tiles give many programs to hide its latency."""
    bh = tl.program_id(0)
    ik = tl.program_id(1)
    rk = ik * BK + tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    P = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        P += tl.load(init + bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]).to(tl.float32)
    for i in range(0, NS):
        if REVERSE:
            j = NS - 1 - i
        else:
            j = i
        base = (bh * NS + j).to(tl.int64)
        if STORE_OUT:
            tl.store(out + base * K * V + rk[:, None] * V + rv[None, :], P)
        aj = tl.load(a + base * K + rk)
        P = P * tl.exp(aj)[:, None] + tl.load(s + base * K * V + rk[:, None] * V + rv[None, :])
    tl.store(final + bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :], P)


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


@triton.jit
def _state_unit(scale, GATE: tl.constexpr):
    """What the backward's dk and dv kernels keep their state gradient dH in units of: per key (GATE 3) dH / scale,
    so each chunk's update is one dot accumulating in place (scale·dot(...) held a second float32 state tile:
    255 registers and spills); the scalar kinds keep dH itself (the same change there spilled more, and made
    g_gamma's forward+backward 2.09 → 2.54 ms on an H200)."""
    if GATE == 3:
        return scale
    else:
        return 1.0


@triton.jit
def _state_dot(x, S, dt: tl.constexpr, SF32: tl.constexpr, PREC: tl.constexpr):
    """x `[C, N]` @ Sᵀ for a float32 state S `[M, N]`. SF32 0: in x's dtype; 1: in float32 (tf32); 2: S split
    into two halves in x's dtype (S = hi + lo: ~2^-16 relative for bf16), two dots that keep x as it is.
    The gate gradient needs SF32 > 0: a bf16-rounded state breaks the cancellation in q⊙dq − k⊙dk."""
    if SF32 == 2:
        hi = S.to(dt)
        lo = (S - hi.to(tl.float32)).to(dt)
        return tl.dot(x, tl.trans(hi), input_precision=PREC) + tl.dot(x, tl.trans(lo), input_precision=PREC)
    if SF32 == 1:
        return tl.dot(x.to(tl.float32), tl.trans(S), input_precision=PREC)
    return tl.dot(x, tl.trans(S).to(dt), input_precision=PREC)


@triton.jit
def _bwd_dq_kernel(q, k, kd, eq, v, g, gg, do, h0, dq, gq, st, T, H, SEG, NC, scale,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                   HAS_H0: tl.constexpr, STORE_ST: tl.constexpr, NEED_DG: tl.constexpr, SF32: tl.constexpr,
                   PREC: tl.constexpr, SPREC: tl.constexpr):
    """One (K-tile, batch·head, segment), walking forward from the state entering the segment (rows rk):
    dq = scale·(exp(b)⊙(do Sᵀ) + intra-chunk), and the q-side gate partial. Per key (GATE 3) the partial is
    written per key into gq; for scalar gates its sum over the tile goes to gq[..., ik]. With STORE_ST the
    last segment also writes the state after the last token, S_T (rows rk), to st: the host forms the
    final-state gate term Σ_v S_T⊙dht from it once dht is there (so dht is not needed before this kernel).

    Per key, q, kd, eq and g are _gate_operands_kernel's qd, kd, eq and chunk totals (k is not read: level 0's keys
    kn come from kd, _level0_keys). The gate partials multiply by the same bf16-rounded decayed operands (qd, kn,
    kd) that built the other side's terms, so that q⊙dq − k⊙dk cancels as it does in exact arithmetic."""
    ik = tl.program_id(0)
    bh = tl.program_id(1)
    js = tl.program_id(2)
    ns = tl.num_programs(2)
    nk = tl.num_programs(0)
    b = bh // H
    h = bh % H
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
        bk, bkd = _chunk_keys(k, kd, g, row, m, bh, t0, NC, rk, K, C, GATE)
        bv = tl.load(v + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        bdo = tl.load(do + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
        dA = tl.dot(bdo, tl.trans(bv), input_precision=PREC)        # [C(t), C(s)] = do_t·v_s
        inter = _state_dot(bdo, S, dt, SF32, SPREC)                  # [C, BK] = do_t Sᵀ
        if GATE == 0:
            acc = inter + tl.dot(tl.where(causal, dA, 0.0).to(dt), bk, input_precision=PREC)
            S += tl.dot(tl.trans(bk), bv, input_precision=PREC)
        elif GATE == 3:
            x = inter + tl.dot(tl.where(causal, dA, 0.0).to(dt), bk, input_precision=PREC)   # bk: kn
            ptr = row[:, None] * K + rk[None, :]
            acc = x * tl.load(eq + ptr, mask=m[:, None], other=0.0).to(tl.float32)   # level 0's query factor exp(b)
            if NEED_DG:
                tl.store(gq + ptr, scale * tl.load(q + ptr, mask=m[:, None], other=0.0).to(tl.float32) * x,
                         mask=m[:, None])
            S = S * tl.exp(bl)[:, None] + tl.dot(tl.trans(bkd), bv, input_precision=PREC)
        else:
            bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
            gc = _gate_chunk(g, gamma, b, h, t, m, T, H, rk, K, GATE)
            bc = tl.cumsum(gc, 0)
            bl = tl.sum(gc, 0)
            dA = tl.where(causal, dA * tl.exp(bc[:, None] - bc[None, :]), 0.0)
            intra = tl.dot(dA.to(dt), bk, input_precision=PREC)
            acc = inter * tl.exp(bc)[:, None] + intra
            if NEED_DG:
                qd = (bq * tl.exp(bc)[:, None]).to(dt)
                part = tl.sum(qd.to(tl.float32) * inter + bq.to(tl.float32) * intra, 1)
                tl.store(gq + row * nk + ik, scale * part, mask=m)
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
    [C, BK] tile took 870 of the dk loop's 2,925 instructions, 380 of them shuffles)."""
    tot = tl.sum(d, 0)
    after = tl.cumsum(tot, 0, reverse=True) - tot + carry[None, :]        # the sum after each run
    return tl.cumsum(d, 0, reverse=True) + after[None, :, :], tot


@triton.jit
def _bwd_dk_kernel(q, k, kd, ek, v, g, gg, do, dhe, hin, dk, gk, dg, term, dh0, T, H, SEG, NC, scale,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                   HAS_DHE: tl.constexpr, HAS_TERM: tl.constexpr, NEED_DG: tl.constexpr, SF32: tl.constexpr,
                   PREC: tl.constexpr, SPREC: tl.constexpr):
    """One (K-tile, batch·head, segment), walking backward from the gradient of the state leaving the
    segment (rows rk): dk, the k-side gate partial, and segment 0's dh0 rows.

    Per key (GATE 3) it finishes the gate gradient in place: dg holds the q-side partial from the dq kernel;
    this kernel subtracts k⊙dk, leaving dL/dA, and writes dg = the reverse sum of dL/dA inside the chunk plus
    the carry (Σ of dL/dA after the chunk). The carry enters the segment as dg at the first token after it:
    Σ_v P ⊙ dhe (P the state entering the next segment, hin `[B·H, NS, K, V]`; dhe the gradient of the one leaving this segment, = exp(g_s)⊙dS_s;
    dL/dg_s = Σ_v exp(g_s)S_{s−1}⊙dS_s), so no segment waits for the sums of the later ones; the last segment
    starts from the final-state term. Scalar gates write their tile's k-side partial to gk[..., ik] (the host
    sums: a 1-D reverse cumulative sum in this kernel made the scalar-gate backward 6% slower on an H100).
    Per key, q, kd, ek and g are _gate_operands_kernel's qd, kd, ek and chunk totals (k is not read)."""
    ik = tl.program_id(0)
    bh = tl.program_id(1)
    js = tl.program_id(2)
    ns = tl.num_programs(2)
    nk = tl.num_programs(0)
    b = bh // H
    h = bh % H
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
                # register limit. kn as the other kernels round it (_level0_keys).
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
                d -= scale * (bkd * e0.to(dt)[None, None, :]).to(tl.float32) * intra
                d -= scale * bkd.to(tl.float32) * inter
                sums, runs = _dg_suffix_sums(d, carry)
                tl.store(dg + p3, sums, mask=m3)
                carry += tl.sum(runs, 0)   # (after the store: 8 bytes of spills fewer than before it)
            else:
                ptr = row[:, None] * K + rk[None, :]
                kdf = tl.load(ek + ptr, mask=m[:, None], other=0.0).to(tl.float32)
                kf = kdf * _chunk_scales(g, bh, t0, NC, rk, K, C)[None, :]
                tl.store(dk + ptr, (scale * (intra * kf + inter * kdf)).to(dk.dtype.element_ty), mask=m[:, None])
            dH = dH * tl.exp(bl)[:, None] + tl.dot(tl.trans(bq), bdo, input_precision=PREC)
        else:
            bk = tl.load(k + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
            gc = _gate_chunk(g, gamma, b, h, t, m, T, H, rk, K, GATE)
            bc = tl.cumsum(gc, 0)
            bl = tl.sum(gc, 0)
            dec = tl.exp(bc[None, :] - bc[:, None])                   # [s, t]: exp(b_t − b_s)
            intra = tl.dot(tl.where(causal_t, dAt * dec, 0.0).to(dt), bq, input_precision=PREC)
            acc = scale * intra + inter * tl.exp(bl - bc)[:, None]
            if NEED_DG:
                kd_ = (bk * tl.exp(bl - bc)[:, None]).to(dt).to(tl.float32)
                part = tl.sum(scale * bk.to(tl.float32) * intra + kd_ * inter, 1)
                tl.store(gk + row * nk + ik, part, mask=m)
            qd = (bq * tl.exp(bc)[:, None]).to(dt)
            dH = dH * tl.exp(bl) + scale * tl.dot(tl.trans(qd), bdo, input_precision=PREC)
        if GATE != 3:   # (per key: stored above)
            tl.store(dk + row[:, None] * K + rk[None, :], acc.to(dk.dtype.element_ty), mask=m[:, None])
    if js == 0:
        tl.store(dh0 + bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :], dH * unit)


@triton.jit
def _bwd_dv_kernel(q, k, kd, g, gg, do, dhe, dv, T, H, SEG, NC, scale,
                   K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                   HAS_DHE: tl.constexpr, PREC: tl.constexpr):
    """One (V-tile, batch·head, segment), walking backward from the gradient of the state leaving the
    segment (columns rv): dv = (k⊙exp(b_C − b)) dH + scale·Aᵀ do, A the decayed causal q·k scores.
    Per key, q, kd and g are _gate_operands_kernel's qd, kd and chunk totals (k is not read: level 0's keys come
    from kd)."""
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    js = tl.program_id(2)
    ns = tl.num_programs(2)
    b = bh // H
    h = bh % H
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
                bc = tl.cumsum(gc, 0)
                bl = tl.sum(gc, 0)
                At = tl.where(causal_t, tl.dot(bk, tl.trans(bq), input_precision=PREC)
                              * tl.exp(bc[None, :] - bc[:, None]), 0.0)
                kd_ = (bk * tl.exp(bl - bc)[:, None]).to(dt)
                acc = tl.dot(kd_, dH.to(dt), input_precision=PREC)
                qd = (bq * tl.exp(bc)[:, None]).to(dt)
                dH = dH * tl.exp(bl)
            acc += scale * tl.dot(At.to(dt), bdo, input_precision=PREC)
            dH += scale * tl.dot(tl.trans(qd), bdo, input_precision=PREC)
        tl.store(dv + row[:, None] * V + rv[None, :], acc.to(dv.dtype.element_ty), mask=m[:, None])


@triton.jit
def _levels_kernel(q, k, v, g, do, o, dq, dk, dv, gq, steep, T, H, SEG, scale,
                   K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, MODE: tl.constexpr, NEED_DG: tl.constexpr,
                   PREC: tl.constexpr):
    """Per-key gates: for every chunk where a key's gate falls to −LEVEL_SPAN, the exact terms of its tokens
    below that, less what the main kernels' held key factor gave them (see the module docstring), added to
    what the main kernels wrote. (They do not loop over levels themselves: a loop nested in their chunk loop
    stops Triton from pipelining its loads.) One program: one (batch·head, segment), whole K and V; a segment
    the main kernel did not mark in steep `[B·H, NS]` costs one load. MODE 0, after the forward: o. MODE 1,
    after the dq kernel and before the dk kernel (which finishes the gate gradient): dq and, when NEED_DG, both
    sides' gate partials into gq. MODE 2, after the dk and dv kernels: dk and dv."""
    bh = tl.program_id(0)
    js = tl.program_id(1)
    ns = tl.num_programs(1)
    b = bh // H
    h = bh % H
    if tl.load(steep + (bh * ns + js).to(tl.int64)) > 0:
        dt = q.dtype.element_ty
        rk = tl.arange(0, K)
        rv = tl.arange(0, V)
        rc = tl.arange(0, C)
        causal = rc[:, None] >= rc[None, :]
        t_start = js * SEG
        t_end = tl.minimum(t_start + SEG, T)
        for t0 in range(t_start, t_end, C):
            t = t0 + rc
            m = t < t_end
            row = (b * T + t).to(tl.int64) * H + h
            gc = _gate_chunk(g, 0.0, b, h, t, m, T, H, rk, K, 3)
            bc = tl.cumsum(gc, 0)
            bl = tl.sum(gc, 0)
            if tl.min(bc) <= -LEVEL_SPAN:
                bq = tl.load(q + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
                bk = tl.load(k + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
                bv = tl.load(v + row[:, None] * V + rv[None, :], mask=m[:, None], other=0.0)
                # step 0 takes level 0's held part back; level l ≥ 1 has its reference at or below −l·LEVEL_SPAN,
                # a bound on their number (a for loop, not a while: Triton 3.6 failed to compile a dot
                # accumulated in a while loop here)
                steps = tl.minimum(-tl.min(bc) / LEVEL_SPAN, C).to(tl.int32) + 1
                c = tl.zeros([K], dtype=tl.float32)
                if MODE == 0:
                    A = tl.zeros([C, C], dtype=tl.float32)
                    for it in range(0, steps):
                        c, qf, kf = _level_step(bc, bl, c, it)
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
                            c, qf, kf = _level_step(bc, bl, c, it)
                            qd = (bq * qf).to(dt)
                            kn = (bk * kf).to(dt)
                            intra = tl.dot(dAm, kn, input_precision=PREC)
                            addq += intra * qf
                            if NEED_DG:   # q⊙dq − k⊙dk with the operands the dots used (see the dq kernel)
                                part += (qd.to(tl.float32) * intra
                                         - kn.to(tl.float32) * tl.dot(tl.trans(dAm), qd, input_precision=PREC))
                        tl.store(dq + ptr, tl.load(dq + ptr, mask=m[:, None]).to(tl.float32) + scale * addq,
                                 mask=m[:, None])
                        if NEED_DG:
                            tl.store(gq + ptr, tl.load(gq + ptr, mask=m[:, None]) + scale * part, mask=m[:, None])
                    else:
                        addk = tl.zeros([C, K], dtype=tl.float32)
                        At = tl.zeros([C, C], dtype=tl.float32)
                        for it in range(0, steps):
                            c, qf, kf = _level_step(bc, bl, c, it)
                            qd = (bq * qf).to(dt)
                            addk += tl.dot(tl.trans(dAm), qd, input_precision=PREC) * kf
                            At += tl.dot((bk * kf).to(dt), tl.trans(qd), input_precision=PREC)
                        tl.store(dk + ptr, tl.load(dk + ptr, mask=m[:, None]).to(tl.float32) + scale * addk,
                                 mask=m[:, None])
                        causal_t = rc[:, None] <= rc[None, :]        # [C(s), C(t)]: t ≥ s
                        addv = tl.dot(tl.where(causal_t, At, 0.0).to(dt), bdo, input_precision=PREC)
                        vptr = dv + row[:, None] * V + rv[None, :]
                        tl.store(vptr, tl.load(vptr, mask=m[:, None]).to(tl.float32) + scale * addv, mask=m[:, None])


# --------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------

def _check(*xs) -> None:
    """Clear errors for what these kernels do not support (the torch backend covers the rest)."""
    q = xs[0]
    if q.dtype not in _DTYPES:
        raise TypeError(f"triton linear attention supports {_DTYPES}, got {q.dtype} (use backend='torch')")
    for x in xs:
        if x is None:
            continue
        if x.device.type != "cuda" and not _interpreting():
            raise ValueError(f"triton linear attention needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    for name, d in (("K", q.shape[-1]),) + tuple(("V", x.shape[-1]) for x in xs[1:2] if x is not None):
        if d not in _DIMS:
            raise ValueError(f"triton linear attention supports head dims {_DIMS}, got {name}={d}")


def _gate(g, g_gamma, q, opts: LinearKernelOptions):
    """-> (GATE kind, g tensor or dummy, g_gamma tensor or dummy, chunk size)."""
    if g_gamma is not None:
        return 1, q, g_gamma.contiguous(), opts.chunk
    if g is None:
        return 0, q, q, opts.chunk
    if g.dim() == 3:
        return 2, g.contiguous(), q, opts.chunk
    return 3, g.contiguous(), q, opts.chunk_per_key


def _state_products(name, GATE, dtype, need_dg, opts: LinearKernelOptions) -> int:
    """_state_dot's mode for kernel ``name``: 0 (in the inputs' dtype) unless the gate gradient needs float32
    precision; then two bf16 halves or tf32 for bf16 inputs (opts.state_products_bf16), tf32 for float16 (whose
    range might not hold a state's halves)."""
    if not (need_dg and dtype != torch.float32 and opts.gate_grad_f32_state):
        return 0
    return opts.state_products_bf16.get((GATE, name), 1) if dtype == torch.bfloat16 else 1


def _prec(x) -> str:
    # float32 inputs get true float32 products (tf32 would cost ~3e-4 relative error).
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _launch(name: str, dim: int, GATE: int, opts: LinearKernelOptions):
    """-> (tile along a dimension of size dim, the remaining launch settings) of kernel ``name``."""
    cfg = opts.launch_config(name, GATE == 3)
    return min(dim, cfg.block), cfg.launch()


@dataclasses.dataclass
class _GateOperands:
    """Per-key gates: what _gate_operands_kernel wrote for one call. qd, kd like q / k (None where not asked
    for); the backward's factors eq = exp(b), ek = exp(b_C − b) like q, or None; totals `[B·H, NC, 2, K]` float32
    (the chunk totals and level 0's key scales, _chunk_totals and _chunk_scales); steep `[B·H, ns]` int32 marks."""
    qd: torch.Tensor | None
    kd: torch.Tensor | None
    eq: torch.Tensor | None
    ek: torch.Tensor | None
    totals: torch.Tensor
    steep: torch.Tensor

    @property
    def for_forward(self) -> bool:
        """Everything the forward reads."""
        return self.qd is not None and self.kd is not None

    @property
    def complete(self) -> bool:
        """Everything the backward reads."""
        return self.for_forward and self.eq is not None and self.ek is not None


def _gate_operands(q, k, g, C, seg, ns, opts: LinearKernelOptions, kd=None, factors=False) -> _GateOperands:
    """Run _gate_operands_kernel over q and/or k (either may be None; factors: also eq and ek, for the backward,
    which needs q). kd: the keys' kd when an earlier pass wrote it (SP's state pass), taken as it is rather than
    written again."""
    x = q if q is not None else k
    B, T, H, K = x.shape
    NC = triton.cdiv(T, C)
    f32 = dict(device=x.device, dtype=torch.float32)
    ops = _GateOperands(torch.empty_like(q) if q is not None else None,
                        kd if kd is not None else (torch.empty_like(k) if k is not None else None),
                        torch.empty_like(q) if factors else None,
                        torch.empty_like(q) if factors else None,
                        torch.empty(B * H, NC, 2, K, **f32),
                        torch.zeros(B * H, ns, device=x.device, dtype=torch.int32))
    trace.emit("gate_operands", q=q is not None, k=k is not None, kd=kd is not None, factors=factors)
    BK, cfg = _launch("ops_b" if factors else "ops", K, 3, opts)
    grid = (NC * B * H * (K // BK),)   # one flat axis (the kernel's comment says why)
    _gate_operands_kernel[grid](*(t if t is not None else x for t in (q, k)), g,
                                *(t if t is not None else x for t in (ops.qd, ops.kd, ops.eq, ops.ek)),
                                ops.totals, ops.steep, T, H, NC, seg, K=K, BK=BK, C=C,
                                HAS_Q=q is not None, STORE_KD=k is not None and kd is None,
                                STORE_F=factors, **cfg)
    return ops


def _add_levels(mode, steep, seg, C, q, k, v, g, scale, do=None, o=None, dq=None, gq=None, dk=None, dv=None,
                need_dg=False):
    """Launch _levels_kernel (MODE mode) over the segments marked in steep; it adds into the given outputs."""
    B, T, H, K = q.shape
    a = [x if x is not None else q for x in (do, o, dq, dk, dv, gq)]
    _levels_kernel[(B * H, steep.shape[1])](q, k, v, g, *a, steep, T, H, seg, scale, K=K,
                                            V=v.shape[-1], C=C, MODE=mode, NEED_DG=need_dg,
                                            PREC=_prec(q), num_warps=8)


def _num_sms(device, opts: LinearKernelOptions) -> int:
    if opts.num_sms is not None:
        return opts.num_sms
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _segments(programs: int, n_chunks: int, device, opts: LinearKernelOptions) -> int:
    """Segments per sequence: none while there are opts.split_below programs per SM (a split adds state passes),
    else as many as give at most opts.programs_per_sm programs per SM, no segment under opts.min_segment_chunks
    chunks. At most, not at least: a few programs past a whole number of waves leave a last wave almost empty."""
    if opts.segments is not None:
        return max(1, min(opts.segments, n_chunks))
    sms = _num_sms(device, opts)
    if programs >= opts.split_below * sms:
        return 1
    want = opts.programs_per_sm * sms // programs
    return max(1, min(want, n_chunks // opts.min_segment_chunks))


def _layout(T: int, C: int, ns: int):
    """-> (segment length in tokens (a multiple of C), number of segments)."""
    n = triton.cdiv(T, C)
    seg = triton.cdiv(n, ns) * C
    return seg, triton.cdiv(T, seg)


def _states(x, y, g, gg, GATE, C, seg, ns, scale, from_start, opts: LinearKernelOptions):
    """Per-segment states `[B, H, ns, K, V]` and total log gates `[B, H, ns, K]` (float32). Per-key gates: x
    and g are _gate_operands' kd (from_start=False) or qd (from_start=True) and chunk totals."""
    B, T, H, K = x.shape
    V = y.shape[-1]
    s = torch.empty(B, H, ns, K, V, device=x.device, dtype=torch.float32)
    a = torch.empty(B, H, ns, K, device=x.device, dtype=torch.float32)
    trace.emit("states", from_start=from_start)
    BV, cfg = _launch("state", V, GATE, opts)
    _state_kernel[(V // BV, B * H, ns)](x, y, g, gg, s, a, T, H, seg, triton.cdiv(T, C), scale, K=K, V=V, BV=BV,
                                       C=C, GATE=GATE, FROM_START=from_start, PREC=_prec(x), **cfg)
    return s, a


def _scan(s, a, init, reverse, store_out=True):
    """Scan of segment states: -> (per-segment prefixes `[B, H, ns, K, V]` or None, final `[B, H, K, V]`)."""
    B, H, ns, K, V = s.shape
    out = torch.empty_like(s) if store_out else s
    final = torch.empty(B, H, K, V, device=s.device, dtype=torch.float32)
    BK, BV = min(K, 16), min(V, 64)
    init_ = init.contiguous() if init is not None else s
    _scan_kernel[(B * H, K // BK, V // BV)](s, a, init_, out, final, ns, K=K, V=V, BK=BK, BV=BV,
                                            HAS_INIT=init is not None, REVERSE=reverse, STORE_OUT=store_out,
                                            num_warps=4, num_stages=3)
    return (out if store_out else None), final


@dataclasses.dataclass
class SegmentStates:
    """A long sequence's per-segment states, kept so a later call skips recomputing them.

    Segments of ``seg`` tokens; ``states`` `[B, H, ns, K, V]` float32: from zero over (k, v) (see
    :func:`segment_state`) or scaled from the segment start over (q, do) (the backward's, see
    :func:`prefix_grad`); ``log_decays`` `[B, H, ns, K]` float32, each segment's total log gate.
    ``prefixes`` `[B, H, ns, K, V]` float32, set by ``forward(..., return_saved=True)``: the states entering
    each segment, initial state included, so valid only for the same initial_state. The forward returns them
    in place of ``states`` (then None): the backward needs only the prefixes, and both would hold two states
    per segment until the backward. ``zero_prefixes`` (same shape), set beside ``states`` by
    ``segment_state(..., return_saved=True, keep_prefixes=True)``: the states entering each segment from a
    zero initial state, which a forward without initial_state uses in place of its own scan. ``operands``
    (per-key gates): what a pre-pass wrote, for the next call on the same inputs. Set by
    ``segment_state(..., return_saved=True)``: the decayed keys kd, which the forward then takes; by
    ``forward(..., return_saved=True)`` while options.keep_gate_operands: all the decayed operands and the backward's
    factors, so the backward (and ``prefix_grad``) skip their own pre-pass. With operands the value is
    returned even for a sequence run as one segment."""
    seg: int
    states: torch.Tensor | None
    log_decays: torch.Tensor | None
    prefixes: torch.Tensor | None = None
    zero_prefixes: torch.Tensor | None = None
    operands: _GateOperands | None = None

    @property
    def n(self) -> int:
        """The number of segments."""
        if self.log_decays is not None:
            return self.log_decays.shape[2]
        return self.operands.steep.shape[1] if self.operands is not None else 1

    def operands_only(self) -> SegmentStates | None:
        """Only the gate operands (None without them): for a backward from another initial state than the
        forward's (SP's backward, whose forward may have run from zero prefixes), where the prefixes do not hold
        but the operands do."""
        return SegmentStates(self.seg, None, None, operands=self.operands) if self.operands is not None else None


def _split(B, H, T, V, C, GATE, device, opts: LinearKernelOptions):
    """-> (segment length, number of segments) of a sequence; one plan for every entry point, so the
    segment states one call computes fit the next."""
    programs = B * H * (V // _launch("fwd", V, GATE, opts)[0])
    return _layout(T, C, _segments(programs, triton.cdiv(T, C), device, opts))


def _kv_states(k, v, gt, gg, GATE, C, seg, ns, opts: LinearKernelOptions) -> SegmentStates:
    """(k, v)'s per-segment states (per-key gates: k and gt are _gate_operands' kd and chunk totals)."""
    return SegmentStates(seg, *_states(k, v, gt, gg, GATE, C, seg, ns, 1.0, False, opts))


def _kernel_operands(q, k, gt, ops):
    """-> (q, k, kd, eq, ek, g) as the main kernels take them: per-key gates (ops) their decayed operands,
    factors and chunk totals (k: the inputs', which no per-key main kernel reads), else the inputs (q stands in
    for what a kind does not read)."""
    if ops is None:
        return q, k, q, q, q, gt
    return ops.qd, k, ops.kd, *(x if x is not None else q for x in (ops.eq, ops.ek)), ops.totals


def _in_bf16(x, g) -> bool:
    """Per-key gates on float16 inputs run in bf16: kn = k⊙exp(−b) may reach exp(LEVEL_SPAN), far past float16's
    range (a gate falling below about −11 inside a chunk gave NaN), while bf16 has float32's exponents."""
    return x.dtype == torch.float16 and g is not None and g.dim() == 4


def _bf16(*xs):
    return tuple(x.to(torch.bfloat16) if x is not None else None for x in xs)


def forward(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
            return_saved=False, kv_states=None, options: LinearKernelOptions | None = None):
    """-> (o `[B, T, H, V]` in q's dtype, final state `[B, H, K, V]` float32 or None).

    kv_states: this sequence's :class:`SegmentStates` from :func:`segment_state` (SP computes them first),
    so the forward skips its own state pass. return_saved: also return a :class:`SegmentStates` with the
    prefixes it entered its segments with (this initial_state included) and, for per-key gates while
    options.keep_gate_operands, its gate operands (None when neither: one segment, no per-key gates), for
    ``backward(..., kv_states=...)`` of the same inputs and initial_state. options: None for the defaults."""
    opts = resolve(options)
    _check(q, v, k, initial_state)
    if _in_bf16(q, g):
        out = forward(*_bf16(q, k, v), g, g_gamma, scale, initial_state, output_final_state, return_saved, kv_states,
                      options=opts)
        return (out[0].to(q.dtype),) + tuple(out[1:])
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    trace.emit("forward", dtype=q.dtype, return_saved=return_saved)
    GATE, gt, gg, C = _gate(g, g_gamma, q, opts)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    ht = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    if T == 0:
        if ht is not None:
            ht.copy_(initial_state if initial_state is not None else torch.zeros_like(ht))
        return (o, ht, None) if return_saved else (o, ht)
    BV, cfg = _launch("fwd", V, GATE, opts)
    seg, ns = (kv_states.seg, kv_states.n) if kv_states is not None else _split(B, H, T, V, C, GATE, q.device, opts)
    h0 = initial_state.contiguous() if initial_state is not None else None
    keep = return_saved and opts.keep_gate_operands   # for the backward: its factors too
    ops = None
    if GATE == 3:
        have = kv_states.operands if kv_states is not None else None
        if have is not None and (have.complete if keep else have.for_forward):
            ops = have   # segment_state(..., q=q) wrote them all
        else:
            ops = _gate_operands(q, k, gt, C, seg, ns, opts, kd=have.kd if have is not None else None, factors=keep)
    qx, kx, kdx, _, _, gx = _kernel_operands(q, k, gt, ops)
    if ns > 1:
        # Long sequences: every segment's state in parallel, a scan for the prefixes, then all segments.
        if kv_states is None:
            kv_states = _kv_states(kdx if ops else k, v, gx, gg, GATE, C, seg, ns, opts)
        elif kv_states.states is None:
            raise ValueError("kv_states holds no per-segment states (a forward's saved prefixes are for backward)")
        if h0 is None and ht is None and kv_states.zero_prefixes is not None:
            h0 = kv_states.zero_prefixes
        else:
            h0, final = _scan(kv_states.states, kv_states.log_decays, h0, reverse=False)
            if ht is not None:
                ht.copy_(final)
        saved = SegmentStates(seg, None, kv_states.log_decays, h0)
    else:
        saved = None
    if keep and ops is not None:
        saved = saved if saved is not None else SegmentStates(seg, None, None)
        saved.operands = ops
    _fwd_kernel[(V // BV, B * H, ns)](qx, kx, kdx, v, gx, gg, o, h0 if h0 is not None else q,
                                      ht if ht is not None else o, T, H, seg, triton.cdiv(T, C), scale,
                                      K=K, V=V, BV=BV, C=C, GATE=GATE, HAS_H0=h0 is not None,
                                      STORE_HT=(ht is not None and ns == 1), PREC=_prec(q), **cfg)
    if ops is not None:
        _add_levels(0, ops.steep, seg, C, q, k, v, gt, scale, o=o)
    return (o, ht, saved) if return_saved else (o, ht)


def _arrived(dht, q):
    """The deferred dht: the function's result, checked as an eager dht is."""
    dht = dht()
    if dht is not None:
        _check(q, dht)
    return dht


def _reverse_cumsum(x, dim):
    """Σ_{j ≥ i} x_j along dim. The scan runs over the last dimension of a contiguous copy: torch's scan
    along an outer dimension with few columns (T of [B, T, H]) took 11 ms at T=65536 on an H100."""
    y = x.movedim(dim, -1).contiguous()
    return y.flip(-1).cumsum(-1).flip(-1).movedim(-1, dim)


def backward(q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True, kv_states=None,
             qdo_states=None, options: LinearKernelOptions | None = None):
    """-> (dq, dk, dv, dg, dh0): dg in the shape of g (or of g_gamma `[H]`; None without decay or when
    not need_dg), dh0 `[B, H, K, V]` float32 even when initial_state is None. kv_states / qdo_states: the
    :class:`SegmentStates` of these inputs from ``forward(..., return_saved=True)`` (same initial_state: its
    prefixes are used as they are) or :func:`segment_state` / ``prefix_grad(..., return_saved=True)`` (same
    scale), or None: the backward then computes them. dht `[B, H, K, V]` or None, or a function that returns
    it: called once the dq kernel (which needs no dht) has been launched, so SP's reverse collective runs
    beside that kernel.

    Three kernels, each walking one (tile, batch·head, segment): dq forward over K-tiles, dk backward over
    K-tiles, dv backward over V-tiles, so no program holds a whole `[K, V]` state (see the module docstring
    for the gate gradient)."""
    opts = resolve(options)
    deferred = callable(dht)
    _check(q, v, k, do, initial_state, None if deferred else dht)
    if _in_bf16(q, g):
        dq, dk, dv, dg, dh0 = backward(*_bf16(q, k, v), g, g_gamma, scale, initial_state, *_bf16(do), dht, need_dg,
                                       kv_states, qdo_states, options=opts)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous().to(q.dtype)
    trace.emit("backward", dtype=q.dtype)
    GATE, gt, gg, C = _gate(g, g_gamma, q, opts)
    need_dg = bool(need_dg and GATE)
    dev = q.device
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dh0 = torch.empty(B, H, K, V, device=dev, dtype=torch.float32)
    if T == 0:
        if deferred:
            dht = _arrived(dht, q)
        dh0.copy_(dht if dht is not None else torch.zeros_like(dh0))
        dg = torch.zeros_like(g_gamma if GATE == 1 else g) if need_dg else None
        return dq, dk, dv, dg, dh0
    (BK, cq), (BKk, ck), (BV, cv) = (_launch("dq", K, GATE, opts), _launch("dk", K, GATE, opts),
                                     _launch("dv", V, GATE, opts))
    given = [x for x in (kv_states, qdo_states) if x is not None]
    seg, ns = (given[0].seg, given[0].n) if given else _split(B, H, T, V, C, GATE, dev, opts)
    if any((x.seg, x.n) != (seg, ns) for x in given):
        raise ValueError("kv_states and qdo_states must come from the same segment plan")
    h0 = initial_state.contiguous() if initial_state is not None else None
    # per-key gates: the decayed operands and the gradients' own factors (the forward's, when it kept them)
    ops = None
    if GATE == 3:
        ops = kv_states.operands if kv_states is not None else None
        if ops is None or not ops.complete:
            ops = _gate_operands(q, k, gt, C, seg, ns, opts, factors=True)
    qx, kx, kdx, eqx, ekx, gx = _kernel_operands(q, k, gt, ops)
    if ns > 1:
        if kv_states is not None and kv_states.prefixes is not None:
            h0 = kv_states.prefixes
        elif kv_states is not None and kv_states.zero_prefixes is not None and h0 is None:
            h0 = kv_states.zero_prefixes
        else:
            kv = kv_states if kv_states is not None and kv_states.states is not None else \
                _kv_states(kdx if ops else k, v, gx, gg, GATE, C, seg, ns, opts)
            h0, _ = _scan(kv.states, kv.log_decays, h0, reverse=False)
        if qdo_states is None:
            qdo_states = SegmentStates(seg, *_states(qx, do, gx, gg, GATE, C, seg, ns, scale, True, opts))
    prec = _prec(q)
    # The gate gradient needs the state products in float32 precision (bf16 states miss its tolerance):
    # tf32 or two bf16 halves of the state, per kernel (_state_products).
    sf32 = {name: _state_products(name, GATE, q.dtype, need_dg, opts) for name in ("dq", "dk")}
    sprec = {name: "tf32" if mode == 1 else prec for name, mode in sf32.items()}
    nk = K // BK
    f32 = dict(device=dev, dtype=torch.float32)
    # the state after the last token, for the final-state gate term (when a dht may come)
    st = torch.empty(B, H, K, V, **f32) if need_dg and (deferred or dht is not None) else None
    gq = gk = None
    if GATE == 3 and need_dg:
        gq = torch.empty(B, T, H, K, **f32)          # the q-side partial; the dk kernel leaves dg in its place
    elif need_dg:
        gq = torch.empty(B, T, H, nk, **f32)         # the q-side partial of each dq K-tile
        gk = torch.empty(B, T, H, K // BKk, **f32)   # ... and the k-side one of each dk K-tile
    dummy = q
    common = dict(K=K, V=V, C=C, GATE=GATE, PREC=prec)
    NC = triton.cdiv(T, C)
    _bwd_dq_kernel[(nk, B * H, ns)](qx, kx, kdx, eqx, v, gx, gg, do, h0 if h0 is not None else dummy, dq,
                                    gq if gq is not None else dummy, st if st is not None else dummy,
                                    T, H, seg, NC, scale,
                                    BK=BK, HAS_H0=h0 is not None, STORE_ST=st is not None, NEED_DG=need_dg,
                                    SF32=sf32["dq"], SPREC=sprec["dq"], **common, **cq)
    trace.emit("bwd_dq")
    if deferred:
        dht = _arrived(dht, q)
    term = (st * dht).sum(-1) if st is not None and dht is not None else None   # [B, H, K]
    dhe = dht.contiguous() if dht is not None else None
    if ns > 1:
        # the gradient of the state leaving each segment (dht past the last): a reverse scan of the (q, do) states
        dhe, _ = _scan(qdo_states.states, qdo_states.log_decays, dhe, reverse=True)
    if ops is not None:   # before the dk kernel, which takes the gate gradient on from gq
        _add_levels(1, ops.steep, seg, C, q, k, v, gt, scale, do=do, dq=dq, gq=gq, need_dg=need_dg)
    _bwd_dk_kernel[(K // BKk, B * H, ns)](qx, kx, kdx, ekx, v, gx, gg, do, dhe if dhe is not None else dummy,
                                    h0 if ns > 1 else dummy, dk, gk if gk is not None else dummy,
                                    gq if GATE == 3 and need_dg else dummy,
                                    term if term is not None else dummy,
                                    dh0, T, H, seg, NC, scale, BK=BKk, HAS_DHE=dhe is not None,
                                    HAS_TERM=term is not None, NEED_DG=need_dg, SF32=sf32["dk"],
                                    SPREC=sprec["dk"], **common, **ck)
    _bwd_dv_kernel[(V // BV, B * H, ns)](qx, kx, kdx, gx, gg, do, dhe if dhe is not None else dummy, dv, T, H,
                                         seg, NC, scale, BV=BV, HAS_DHE=dhe is not None, **common, **cv)
    if ops is not None:
        _add_levels(2, ops.steep, seg, C, q, k, v, gt, scale, do=do, dk=dk, dv=dv)
    if not need_dg:
        return dq, dk, dv, None, dh0
    if GATE == 3:
        return dq, dk, dv, gq.to(g.dtype), dh0
    # scalar gates: dL/dA_t = Σ_tiles (q-side − k-side); dg_s = Σ_{t≥s} dL/dA_t (+ the final-state term)
    dgl = _reverse_cumsum(gq.sum(-1) - gk.sum(-1), 1)                                # [B, T, H]
    if term is not None:
        dgl = dgl + term.sum(-1).unsqueeze(1)
    dg = dgl.sum((0, 1)).to(g_gamma.dtype) if GATE == 1 else dgl.to(g.dtype)
    return dq, dk, dv, dg, dh0


def segment_state(k, v, g=None, g_gamma=None, return_saved=False, keep_prefixes=False, q=None, factors=False,
                  options: LinearKernelOptions | None = None):
    """A segment's state from zero and its total log decay.

    -> (S `[B, H, K, V]` float32, log_decay `[B, H, K]` float32), S = Σ_t exp(A_T - A_t) ⊙ k_t v_tᵀ, and with
    return_saved the per-segment :class:`SegmentStates` (or None) for ``forward(..., kv_states=...)`` (per-key
    gates: with the decayed keys, which that forward takes rather than writing them again); with
    keep_prefixes as well, they hold the scan's prefixes from zero (``zero_prefixes``), so a forward without
    an initial state skips its own scan (one with an initial state scans anyway: storing them would only
    cost it). Per-key gates with return_saved: q, the queries of that forward, makes the pre-pass write
    their operands too (and with factors the backward's, as ``forward(..., return_saved=True)`` keeps them),
    so the forward runs no pre-pass (SP's state pass and output pass: one pre-pass, not two).
    A state-only pass (no output); long segments are split across SMs and combined by a scan.
    """
    opts = resolve(options)
    _check(k, v, q)
    if q is not None and q.shape != k.shape:
        raise ValueError(f"q must have k's shape {tuple(k.shape)}, got {tuple(q.shape)}")
    if _in_bf16(k, g):
        return segment_state(*_bf16(k, v), g, g_gamma, return_saved, keep_prefixes, *_bf16(q), factors,
                             options=opts)
    B, T, H, K = k.shape
    V = v.shape[-1]
    k, v = k.contiguous(), v.contiguous()
    trace.emit("segment_state", dtype=k.dtype)
    GATE, gt, gg, C = _gate(g, g_gamma, k, opts)
    if T == 0:
        out = (torch.zeros(B, H, K, V, device=k.device, dtype=torch.float32),
               torch.zeros(B, H, K, device=k.device, dtype=torch.float32))
        return out + (None,) if return_saved else out
    seg, ns = _split(B, H, T, V, C, GATE, k.device, opts)
    ops = None
    if GATE == 3:   # the state reads the decayed keys
        with_q = return_saved and q is not None
        ops = _gate_operands(q.contiguous() if with_q else None, k, gt, C, seg, ns, opts, factors=with_q and factors)
        k, gt = ops.kd, ops.totals
    kv = _kv_states(k, v, gt, gg, GATE, C, seg, ns, opts)
    kv.operands = ops if return_saved else None
    total = kv.log_decays.sum(2)
    if ns == 1:
        out = (kv.states[:, :, 0], total)
        return out + (kv if ops is not None else None,) if return_saved else out
    keep = return_saved and keep_prefixes
    prefixes, final = _scan(kv.states, kv.log_decays, None, reverse=False, store_out=keep)
    if not return_saved:
        return final, total
    kv.zero_prefixes = prefixes if keep else None
    return final, total, kv


def prefix_grad(q, g, g_gamma, scale, do, return_saved=False, kv_states=None,
                options: LinearKernelOptions | None = None):
    """Gradient of the segment's outputs w.r.t. its entering state: scale·Σ_t (q_t⊙exp(A_t)) do_tᵀ, float32
    `[B, H, K, V]`; with return_saved also the per-segment :class:`SegmentStates` for
    ``backward(..., qdo_states=...)`` (one segment too: its ``log_decays`` sum to the sequence's total log gate,
    which SP needs beside this gradient). kv_states: the forward's :class:`SegmentStates` of these inputs, whose
    gate operands (per-key gates) give the decayed queries, or None."""
    opts = resolve(options)
    _check(q, do)
    if _in_bf16(q, g):
        return prefix_grad(*_bf16(q), g, g_gamma, scale, *_bf16(do), return_saved, kv_states, options=opts)
    B, T, H, K = q.shape
    V = do.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    q, do = q.contiguous(), do.contiguous().to(q.dtype)
    trace.emit("prefix_grad", dtype=q.dtype)
    GATE, gt, gg, C = _gate(g, g_gamma, q, opts)
    if T == 0:
        out = torch.zeros(B, H, K, V, device=q.device, dtype=torch.float32)
        empty = SegmentStates(0, out.unsqueeze(2), torch.zeros(B, H, 1, K, device=q.device, dtype=torch.float32))
        return (out, empty) if return_saved else out
    seg, ns = (kv_states.seg, kv_states.n) if kv_states is not None else _split(B, H, T, V, C, GATE, q.device, opts)
    if GATE == 3:   # the state reads the decayed queries
        ops = kv_states.operands if kv_states is not None else None
        if ops is None or ops.qd is None:
            ops = _gate_operands(q, None, gt, C, seg, ns, opts)
        q, gt = ops.qd, ops.totals
    qdo = SegmentStates(seg, *_states(q, do, gt, gg, GATE, C, seg, ns, scale, True, opts))
    if ns == 1:
        return (qdo.states[:, :, 0], qdo) if return_saved else qdo.states[:, :, 0]
    _, final = _scan(qdo.states, qdo.log_decays, None, reverse=True, store_out=False)
    return (final, qdo) if return_saved else final


def add_prefix(o, q, g, g_gamma, scale, P, options: LinearKernelOptions | None = None):
    """o + scale·(q ⊙ exp(A))ᵀ P in one pass over (o, q): the output correction for a segment entered with
    state P `[B, H, K, V]` (A the segment-inclusive cumulative log gate). Returns a new tensor like o."""
    _check(q, o, P)
    B, T, H, K = q.shape
    V = o.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    opts = resolve(options)
    q, o, P = q.contiguous(), o.contiguous(), P.contiguous()
    GATE, gt, gg, C = _gate(g, g_gamma, q, opts)
    out = torch.empty_like(o)
    if T == 0:
        return out
    N = triton.cdiv(T, C)
    goff = q
    if GATE in (2, 3):
        # log gate summed over the chunks before each chunk: [B, N, H, KG] float32 (a small tensor)
        gf = g.float()
        gf = torch.nn.functional.pad(gf, (0, 0, 0, 0, 0, N * C - T) if GATE == 3 else (0, 0, 0, N * C - T))
        sums = gf.view(B, N, C, H, -1).sum(2)
        goff = (sums.cumsum(1) - sums).contiguous()
    BV = min(V, 64)
    _prefix_kernel[(V // BV, B * H, N)](o, q, gt, gg, goff, P, out, T, H, N, scale, K=K, V=V, BV=BV, C=C,
                                        GATE=GATE, PREC=_prec(q), num_warps=4)
    return out


class TritonBackend:
    """The Triton kernels behind the local-compute contract (longscan.kernels.linear_attention.backend), with
    their options. Its saved records are :class:`SegmentStates`."""
    name = "triton"
    # The gradient of g_gamma is a token-weighted sum over the whole sequence of nearly cancelling terms: in bf16
    # it missed the 1e-2 tolerance on an H100 even with float32 state products, so the dispatch refuses a g_gamma
    # that requires grad here (the models keep g_gamma a fixed buffer).
    supports_g_gamma_grad = False

    def __init__(self, options: LinearKernelOptions | None = None):
        self.options = resolve(options)

    def forward(self, q, k, v, g, g_gamma, scale, initial_state, output_final_state, *, keep=False, saved=None):
        o, ht, *kept = forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state, return_saved=keep,
                               kv_states=saved, options=self.options)
        return o, ht, (kept[0] if keep else None)

    def backward(self, q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True, *, saved=None, qdo=None):
        return backward(q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg, kv_states=saved,
                        qdo_states=qdo, options=self.options)

    def segment_state(self, k, v, g, g_gamma, *, q=None, keep=False, zero_prefixes=False):
        return segment_state(k, v, g, g_gamma, return_saved=True, keep_prefixes=zero_prefixes, q=q, factors=keep,
                             options=self.options)

    def add_prefix(self, o, q, g, g_gamma, scale, P):
        return add_prefix(o, q, g, g_gamma, scale, P, options=self.options)

    def prefix_grad(self, q, g, g_gamma, scale, do, *, saved=None):
        dP, qdo = prefix_grad(q, g, g_gamma, scale, do, return_saved=True, kv_states=saved, options=self.options)
        # the state pass's own totals: a second reduction over g would read all of it again
        return dP, qdo.log_decays.sum(2), qdo


__all__ = ["forward", "backward", "segment_state", "add_prefix", "prefix_grad", "SegmentStates",
           "LinearKernelOptions", "TritonBackend"]
