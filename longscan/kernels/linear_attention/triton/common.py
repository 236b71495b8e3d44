"""Shared `@triton.jit` helpers of the linear-attention kernels: gate tiles, per-key level-0 factors and keys,
per-segment state tiles, the state products of the backward. Inlined where they are called."""
from __future__ import annotations

import triton
import triton.language as tl

# Per-key gates: one level of the intra-chunk factorisation spans this much log decay (the package docstring).
# exp(60) is far inside float32/bf16 range, and a query factor that underflows (exp(b − c) < exp(−87)) drops
# terms below exp(60 − 87) ≈ 2e-12 of the others.
LEVEL_SPAN = tl.constexpr(60.0)
# Per-key dk kernel: the gate gradient's in-chunk reverse sum runs over [RUN, C / RUN, BK] views of its tiles, RUN
# consecutive tokens along the first axis, which Triton keeps inside one thread (bwd._dg_suffix_sums).
DG_RUN = tl.constexpr(4)


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
def _scalar_cumulative(gc, GATE: tl.constexpr, RESETS: tl.constexpr):
    """Scalar kinds, one chunk's log gates gc `[C]` -> (b, n, bl, nl): the inclusive cumulative log gate and the
    chunk's total. With RESETS (g, GATE 2, that may hold −inf: full resets) b takes −inf as 0, n counts the resets
    up to each token and nl is the chunk's count: the decay from s to t is then exp(b_t − b_s) where n_t = n_s,
    else 0 (_decay, _same_span), and b stays finite, so no (−inf) − (−inf) arises. Otherwise (finite gates, the
    arithmetic the kernels had before resets) n and nl are 0 and unused."""
    if GATE == 2 and RESETS:
        reset = gc == float("-inf")
        gf = tl.where(reset, 0.0, gc)
        ri = reset.to(tl.int32)
        b = tl.cumsum(gf, 0)
        n = tl.cumsum(ri, 0)
        bl = tl.sum(gf, 0)
        nl = tl.sum(ri, 0)
    else:
        b = tl.cumsum(gc, 0)
        n = 0
        bl = tl.sum(gc, 0)
        nl = 0
    return b, n, bl, nl


@triton.jit
def _decay(x, n, m, GATE: tl.constexpr, RESETS: tl.constexpr):
    """exp(x), the decay over a span of a chunk; with RESETS (g, GATE 2) selected to 0 where a reset lies inside
    it: where the reset counts at its ends (n, m; _scalar_cumulative) differ."""
    if GATE == 2 and RESETS:
        e = tl.where(n == m, tl.exp(x), 0.0)
    else:
        e = tl.exp(x)
    return e


@triton.jit
def _same_span(causal, n, GATE: tl.constexpr, RESETS: tl.constexpr):
    """The causal mask `[C, C]` of a chunk's scores; with RESETS (g, GATE 2) less the pairs a reset separates
    (reset counts n `[C]`, _scalar_cumulative; the mask is symmetric in that part, so it serves both
    orientations)."""
    if GATE == 2 and RESETS:
        keep = causal & (n[:, None] == n[None, :])
    else:
        keep = causal
    return keep


@triton.jit
def _from_start(b, n, GATE: tl.constexpr, RESETS: tl.constexpr):
    """The log decay from the chunk's start to a token (b its cumulative log gate, n its reset count;
    _scalar_cumulative), or of the whole chunk (b, n its totals); with RESETS (g, GATE 2) −inf past a reset, so
    that the state entering the chunk is dropped there and a segment's total (the SP scan's decay) is −inf too."""
    if GATE == 2 and RESETS:
        a = tl.where(n > 0, float("-inf"), b)
    else:
        a = b
    return a


@triton.jit
def _chunk_decays(gc, causal, SBYT: tl.constexpr):
    """Scalar gates g (GATE 2) with RESETS, one chunk of a main kernel: its log gates gc `[C]` -> (d, eq, ek, es):
    the decays exp(b_t − b_s) `[C, C]` of the chunk's scores (rows the later token t, columns the earlier s; SBYT:
    rows s, columns t), 0 on the causal pairs (causal) a reset separates; and the decays from the chunk's start
    exp(b_t), to its end exp(b_C − b_t) `[C]` and over it exp(b_C) (b the inclusive cumulative log gate, b_C the
    chunk's total). The caller keeps the causal pairs of its scores x, where(causal, x·d, 0).

    A chunk holds a reset (a gate of −inf) exactly when its gates sum to −inf (the others are finite and ≤ 0);
    only there do the decays select (_scalar_cumulative, _same_span, _decay). The sum is one value for the whole
    program, so the branch is uniform, and the chunks without a reset (most of them with documents of thousands
    of tokens) take the finite-gate arithmetic and its results, to the bit. (What crosses the branch is the
    decays: a dot's result used inside it broke Triton 3.6's pipeliner, and a `[C, C]` mask kept more registers
    live than the decays that carry it.)"""
    bl = tl.sum(gc, 0)
    if bl == float("-inf"):
        b, n, bl, nl = _scalar_cumulative(gc, 2, True)
        if SBYT:
            d = tl.exp(b[None, :] - b[:, None])
        else:
            d = tl.exp(b[:, None] - b[None, :])
        d = tl.where(_same_span(causal, n, 2, True), d, 0.0)
        eq = _decay(b, n, 0, 2, True)
        ek = _decay(bl - b, n, nl, 2, True)
        es = _decay(bl, nl, 0, 2, True)
    else:
        b = tl.cumsum(gc, 0)
        if SBYT:
            d = tl.exp(b[None, :] - b[:, None])
        else:
            d = tl.exp(b[:, None] - b[None, :])
        eq = tl.exp(b)
        ek = tl.exp(bl - b)
        es = tl.exp(bl)
    return d, eq, ek, es


@triton.jit
def _state_decays(gc):
    """Scalar gates g (GATE 2) with RESETS, one chunk of the state pass: its log gates gc `[C]` -> (a, ek, es,
    total): the log decay from the chunk's start to each token a `[C]` (−inf past a reset: _from_start), the
    decays to its end exp(b_C − b_t) `[C]` and over it exp(b_C), and its total log gate (−inf where it holds a
    reset). The selects run only in the chunks that hold a reset (a uniform branch, as in _chunk_decays)."""
    total = tl.sum(gc, 0)
    if total == float("-inf"):
        b, n, bl, nl = _scalar_cumulative(gc, 2, True)
        a = _from_start(b, n, 2, True)
        ek = _decay(bl - b, n, nl, 2, True)
        es = _decay(bl, nl, 0, 2, True)
    else:
        a = tl.cumsum(gc, 0)
        ek = tl.exp(total - a)
        es = tl.exp(total)
    return a, ek, es, total


@triton.jit
def _key_cumulative(gc):
    """Per-key gates, one chunk's log gates gc `[C, BK]` -> (b, n, bl, nl): per key, the inclusive cumulative log
    gate with its −inf entries (resets) taken as 0, the number of resets up to each token, and the chunk's totals
    of both. Per key as _scalar_cumulative: the decay from s to t is exp(b_t − b_s) where n_t = n_s, else 0."""
    reset = gc == float("-inf")
    gf = tl.where(reset, 0.0, gc)
    ri = reset.to(tl.int32)
    return tl.cumsum(gf, 0), tl.cumsum(ri, 0), tl.sum(gf, 0), tl.sum(ri, 0)


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
    scale rounded to dt costs 2^-9 relative per key, as rounding kn did): the forward's and the dv kernel's. The
    backward's dq and dk kernels, whose gate partials must cancel, take kn as kd times e0 in float32 instead (the
    dq kernel's docstring)."""
    return bkd * e0.to(dt)[None, :]


@triton.jit
def _scores_rest(s, dt: tl.constexpr):
    """What rounding the float32 scores s `[C, C]` to dt leaves, in dt: s ≈ s.to(dt) + _scores_rest(s, dt) to
    ~2^-16 relative for bf16, so a second dot with it takes the scores in about float32 precision."""
    return (s - s.to(dt).to(tl.float32)).to(dt)


@triton.jit
def _chunk_keys(k, kd, g, row, m, bh, t0, NC, rk, K: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr):
    """The keys `[C, len(rk)]` a main kernel's scores take for one chunk (token rows row, mask m) -> (keys, kd): per
    key (GATE 3) level 0's keys built from the pre-pass's kd (g: its chunk totals and scales), and that kd; else k,
    twice. (The addresses as pointer + row offsets + key offsets: a 64-bit `[C, K]` offset tile first cost the dq
    kernel instructions every chunk and spills.)"""
    if GATE == 3:
        bkd = tl.load(kd + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
        bk = _level0_keys(bkd, _chunk_scales(g, bh, t0, NC, rk, K, C), kd.dtype.element_ty)
    else:
        bk = tl.load(k + row[:, None] * K + rk[None, :], mask=m[:, None], other=0.0)
        bkd = bk
    return bk, bkd


@triton.jit
def _chunk_totals(gl, bh, t0, NC, rk, K: tl.constexpr, C: tl.constexpr):
    """Per-key gates: the total log gate b_C `[K]` of the chunk starting at token t0 (gl of _gate_operands_kernel)."""
    return tl.load(gl + (bh * NC + t0 // C).to(tl.int64) * (2 * K) + rk)


@triton.jit
def _chunk_scales(gl, bh, t0, NC, rk, K: tl.constexpr, C: tl.constexpr):
    """Per-key gates: the level-0 scales exp(min(−b_C, LEVEL_SPAN)) `[K]` of the chunk starting at token t0 (gl of
    _gate_operands_kernel; loaded rather than computed: each thread of a main kernel holds many keys of a tile,
    and the exp, for each of them, cost the dv kernel many instructions a chunk)."""
    return tl.load(gl + (bh * NC + t0 // C).to(tl.int64) * (2 * K) + K + rk)


@triton.jit
def _segment_state_tile(ptr, bh, js, ns, rk, rv, K: tl.constexpr, V: tl.constexpr):
    """Rows rk, columns rv of state [bh, js] of a `[B·H, NS, K, V]` float32 tensor (a segment's entering
    state, or the gradient of its leaving state)."""
    return tl.load(ptr + (bh * ns + js).to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]).to(tl.float32)


@triton.jit
def _state_unit(scale, GATE: tl.constexpr):
    """What the backward's dk and dv kernels keep their state gradient dH in units of: per key (GATE 3) dH / scale,
    so each chunk's update is one dot accumulating in place (scale·dot(...) held a second float32 state tile:
    255 registers and spills); the scalar kinds keep dH itself (the same change there spilled more, and made
    g_gamma's forward+backward slower, docs/benchmarks.md)."""
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
def _segment_program(H):
    """Where a main kernel's program works, from its grid (tile, batch·head, segment): -> (tile index, number of
    tiles, bh, segment js, number of segments ns, batch b, head h)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    js = tl.program_id(2)
    ns = tl.num_programs(2)
    ntiles = tl.num_programs(0)
    return tile, ntiles, bh, js, ns, bh // H, bh % H
