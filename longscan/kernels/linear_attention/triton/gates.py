"""Per-key gates' pre-pass: the decayed operands, factors, chunk totals and steep marks every per-key kernel
reads in place of g."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longscan.kernels import trace
from longscan.kernels.linear_attention.options import LinearKernelOptions
from longscan.kernels.linear_attention.triton.common import LEVEL_SPAN, _gate_chunk, _level0_scale
from longscan.kernels.linear_attention.triton.plan import _launch
from longscan.kernels.linear_attention.triton.records import _GateOperands


@triton.jit
def _gate_operands_kernel(q, k, g, qd, kd, eq, ek, gl, steep, steep_chunks, T, H, NC, SEG,
                          K: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, HAS_Q: tl.constexpr,
                          STORE_KD: tl.constexpr, STORE_F: tl.constexpr, RESETS: tl.constexpr,
                          SUFFIX: tl.constexpr):
    """Per-key gates, one (chunk, batch·head, K-tile): the decayed operands every per-key kernel reads in place
    of g, so none of them holds a `[C, K]` gate tile, its cumulative sum or its exps (those cost half the per-key
    forward and kept its chunks at 32 tokens, where Triton compiles the dots to mma.sync rather than wgmma).
    Writes, in q's layout and dtype, with b the chunk-local inclusive cumulative gate: qd = q⊙exp(b) (with HAS_Q)
    and kd = k⊙exp(b_C − b) (with STORE_KD; the main kernels build level 0's keys from it, _level0_keys); with
    STORE_F the factors themselves, eq = exp(b) (in eq's dtype) and ek = exp(b_C − b) (the backward's output
    factors, dq's and dk's); gl `[B·H, NC, 2, K]` float32, the chunk totals b_C and level 0's key scales
    exp(min(−b_C, LEVEL_SPAN)) (_level0_keys); and marks the chunk's segment in steep `[B·H, NS]` when a key
    falls to −LEVEL_SPAN inside it (_levels_kernel then visits it). With RESETS (g may hold −inf) it also marks a
    chunk where a key resets, and every marked chunk in steep_chunks `[B·H, NC]` (None without RESETS: the kernel
    then has no such argument). SUFFIX (float32 inputs): b_C − b as the chunk's sums after each token (a reverse
    scan), not the difference of b_C and b (a sum and a scan that round apart by |b_C|·2⁻²⁴, up to ~1e-5 of the
    last tokens' factors in a steep chunk: their keys make the final state)."""
    # One flat axis, K-tiles fastest, then batch·heads, then chunks: the programs that run together read whole
    # token rows of q, k and g (4 KB at 16 heads × 128 keys), not one head's slice of many rows (chunks fastest:
    # was slower where one head's chunks alone filled the GPU).
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
    if RESETS:
        # −inf gates (resets) taken as 0 in the cumulative gate; per key the chunk's first and last reset (C and
        # −1 without one): reductions, not a second scan, since the operands need only "before the first" and
        # "from the last" (_levels_kernel counts the resets between)
        reset = gc == float("-inf")
        gf = tl.where(reset, 0.0, gc)
        bc = tl.cumsum(gf, 0)
        bl = tl.sum(gf, 0)
        rc = tl.arange(0, C)[:, None]
        first = tl.min(tl.where(reset, rc, C), 0)
        last = tl.max(tl.where(reset, rc, -1), 0)
        held = last < 0   # no reset in the chunk
    else:
        bc = tl.cumsum(gc, 0)
        bl = tl.sum(gc, 0)
    ptr = ((b * T + t).to(tl.int64) * H + h)[:, None] * K + rk[None, :]
    if HAS_Q:
        bq = tl.load(q + ptr, mask=m[:, None], other=0.0)
        if RESETS:
            qf = tl.where(rc < first[None, :], tl.exp(bc), 0.0)   # 0 from a reset on: the entering state is dropped
        else:
            qf = tl.exp(bc)
        tl.store(qd + ptr, (bq * qf).to(qd.dtype.element_ty), mask=m[:, None])
        if STORE_F:
            tl.store(eq + ptr, qf.to(eq.dtype.element_ty), mask=m[:, None])
    if RESETS:
        if SUFFIX:
            kdf = tl.where(rc >= last[None, :], tl.exp(tl.cumsum(gf, 0, reverse=True) - gf), 0.0)
        else:
            kdf = tl.where(rc >= last[None, :], tl.exp(bl[None, :] - bc), 0.0)   # 0 before the chunk's last reset
    elif SUFFIX:
        kdf = tl.exp(tl.cumsum(gc, 0, reverse=True) - gc)
    else:
        kdf = tl.exp(bl[None, :] - bc)
    if STORE_KD:
        bk = tl.load(k + ptr, mask=m[:, None], other=0.0)
        tl.store(kd + ptr, (bk * kdf).to(kd.dtype.element_ty), mask=m[:, None])
    if STORE_F:
        tl.store(ek + ptr, kdf.to(ek.dtype.element_ty), mask=m[:, None])
    if RESETS:
        # A key that resets in the chunk: total −inf (exp gives the state's decay, 0), scale 1. Its level-0 scores
        # (qd·kn) are then 0 on every causal pair, as qd is 0 from its first reset on and kd before its last, and
        # _levels_kernel adds them all.
        total = tl.where(held, bl, float("-inf"))
        base = (bh * NC + n).to(tl.int64) * (2 * K)
        tl.store(gl + base + rk, total)
        tl.store(gl + base + K + rk, tl.where(held, _level0_scale(bl), 1.0))
        if tl.min(total) <= -LEVEL_SPAN:   # with log gates ≤ 0 a chunk's total is its lowest cumulative gate
            ns = tl.cdiv(T, SEG)
            tl.store(steep + (bh * ns + (n * C) // SEG).to(tl.int64), 1)
            tl.store(steep_chunks + (bh * NC + n).to(tl.int64), 1)
    else:
        base = (bh * NC + n).to(tl.int64) * (2 * K)
        tl.store(gl + base + rk, bl)
        tl.store(gl + base + K + rk, _level0_scale(bl))
        if tl.min(bl) <= -LEVEL_SPAN:   # with log gates ≤ 0 a chunk's total is its lowest cumulative gate
            ns = tl.cdiv(T, SEG)
            tl.store(steep + (bh * ns + (n * C) // SEG).to(tl.int64), 1)


def _gate_operands(q, k, g, C, seg, ns, opts: LinearKernelOptions, kd=None, factors=False) -> _GateOperands:
    """Run _gate_operands_kernel over q and/or k (either may be None; factors: also eq and ek, for the backward,
    which needs q). kd: the keys' kd when an earlier pass wrote it (SP's state pass), taken as it is rather than
    written again. opts.resets: g may hold −inf (the kernel's RESETS, and the chunk marks steep_chunks)."""
    x = q if q is not None else k
    B, T, H, K = x.shape
    NC = triton.cdiv(T, C)
    f32 = dict(device=x.device, dtype=torch.float32)
    # the query factor in float32 with opts.dq_factor_f32 (the kernels load and store either dtype)
    ops = _GateOperands(torch.empty_like(q) if q is not None else None,
                        kd if kd is not None else (torch.empty_like(k) if k is not None else None),
                        torch.empty_like(q, dtype=torch.float32 if opts.dq_factor_f32 else q.dtype) if factors
                        else None,
                        torch.empty_like(q) if factors else None,
                        torch.empty(B * H, NC, 2, K, **f32),
                        torch.zeros(B * H, ns, device=x.device, dtype=torch.int32),
                        torch.zeros(B * H, NC, device=x.device, dtype=torch.int32) if opts.resets else None)
    trace.emit("gate_operands", q=q is not None, k=k is not None, kd=kd is not None, factors=factors)
    BK, cfg = _launch("ops_b" if factors else "ops", K, 3, x.dtype, opts)
    grid = (NC * B * H * (K // BK),)   # one flat axis (the kernel's comment says why)
    _gate_operands_kernel[grid](*(t if t is not None else x for t in (q, k)), g,
                                *(t if t is not None else x for t in (ops.qd, ops.kd, ops.eq, ops.ek)),
                                ops.totals, ops.steep, ops.steep_chunks, T, H, NC, seg, K=K, BK=BK, C=C,
                                HAS_Q=q is not None, STORE_KD=k is not None and kd is None,
                                STORE_F=factors, RESETS=opts.resets, SUFFIX=x.dtype == torch.float32, **cfg)
    return ops

