"""The state passes: every segment's state (from zero over (k, v), or scaled from its start over (q, do)) and
total log gate, and the segment-prefix scan that chains them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longscan.kernels import trace
from longscan.kernels.linear_attention.options import LinearKernelOptions
from longscan.kernels.linear_attention.triton.common import (_chunk_totals, _gate_chunk, _segment_program,
                                                             _state_decays)
from longscan.kernels.linear_attention.triton.plan import _launch, _prec
from longscan.kernels.linear_attention.triton.records import StatePass


@triton.jit
def _state_kernel(x, y, g, gg, out_s, out_a, T, H, SEG, NC, scale,
                  K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr,
                  FROM_START: tl.constexpr, PREC: tl.constexpr, RESETS: tl.constexpr):
    """Per segment: FROM_START=False: Σ_t exp(A_end - A_t) ⊙ x_t y_tᵀ (k, v: the segment's state from zero);
    FROM_START=True: scale·Σ_t exp(A_t) ⊙ x_t y_tᵀ (q, do: the gradient of the state entering it).
    A is the inclusive cumulative log gate from the segment start. Also writes the total A_end `[K]`.
    Per-key gates (GATE 3): x is _gate_operands_kernel's kd (k⊙exp(b_C − b)) or qd (q⊙exp(b)), g its chunk
    totals. RESETS: g (GATE 2) may hold −inf, as in _fwd_kernel (a segment's total is then −inf past a reset)."""
    iv, _, bh, js, ns, b, h = _segment_program(H)
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
            if GATE == 2 and RESETS:
                # selecting only in the chunks that hold a reset (_state_decays); a is −inf once a reset has
                # passed: exp gives 0, never (−inf) − (−inf)
                a, ek, es, total = _state_decays(gc)
                if FROM_START:
                    S += tl.dot(tl.trans((bx * tl.exp(aoff[None, :] + a[:, None])).to(dt)), by, input_precision=PREC)
                else:
                    S = S * es + tl.dot(tl.trans((bx * ek[:, None]).to(dt)), by, input_precision=PREC)
                aoff += total
            else:
                # finite gates, in the order of the kernels before resets (which they compile to, ptx_diff.py)
                bc, bl = tl.cumsum(gc, 0), tl.sum(gc, 0)
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


def _states(x, y, g, gg, GATE, C, seg, ns, scale, from_start, opts: LinearKernelOptions):
    """Per-segment states `[B, H, ns, K, V]` and total log gates `[B, H, ns, K]` (float32). Per-key gates: x
    and g are _gate_operands' kd (from_start=False) or qd (from_start=True) and chunk totals. opts.resets: g may
    hold −inf (the host checked it, plan._resets)."""
    B, T, H, K = x.shape
    V = y.shape[-1]
    s = torch.empty(B, H, ns, K, V, device=x.device, dtype=torch.float32)
    a = torch.empty(B, H, ns, K, device=x.device, dtype=torch.float32)
    trace.emit("states", from_start=from_start)
    BV, cfg = _launch("state", V, GATE, x.dtype, opts)
    _state_kernel[(V // BV, B * H, ns)](x, y, g, gg, s, a, T, H, seg, triton.cdiv(T, C), scale, K=K, V=V, BV=BV,
                                       C=C, GATE=GATE, FROM_START=from_start, PREC=_prec(x, opts),
                                       RESETS=opts.resets and GATE >= 2, **cfg)
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


def _kv_states(k, v, gt, gg, GATE, C, seg, ns, opts: LinearKernelOptions) -> StatePass:
    """(k, v)'s per-segment states (per-key gates: k and gt are _gate_operands' kd and chunk totals)."""
    return StatePass(seg, *_states(k, v, gt, gg, GATE, C, seg, ns, 1.0, False, opts))

