"""Chunked linear attention in Triton: the GPU backend of the local-compute contract (docs/design.md).

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
of the state gradient (built from `prefix_grad` pieces). The per-segment states are a
record (records.py: a StatePass of a state pass, a ForwardRecord of a forward) that one entry point hands the
next (SP's state pass → its output pass, `prefix_grad` → the backward,
the forward → the backward: the prefixes it scanned), so those state passes and scans are not repeated.
(SP's backward recomputes the forward's (k, v) states rather than hold them through the step: they would
add a state per segment to its memory.)

Decay kinds (log space, ≤ 0), as a constexpr GATE: 0 none, 1 g_gamma `[H]`, 2 g `[B, T, H]`,
3 g `[B, T, H, K]`. Per-key gates factor the decay inside a chunk, exp(b_t − b_s) = exp(b_t − c)·exp(c − b_s)
(b the chunk-local cumulative gate, c a reference per key), so the scores are matmuls. A pre-pass,
`_gate_operands_kernel`, writes the decayed operands once per call: qd = q⊙exp(b) and kd = k⊙exp(b_C − b)
(b_C the chunk total), the chunk totals, and for the backward the factors exp(b) (dq's; float32 with
options.dq_factor_f32) and exp(b_C − b) (dk's), in q's dtype. The key side of the scores, kn = k⊙exp(−b), is kd
times a per-key scale exp(−b_C), so the main kernels build it from kd as they load it (_level0_keys; the
backward's dq and dk kernels apply the scale in float32) and it is neither written nor read (a pass over q's size
fewer in the pre-pass and in each main kernel). A forward that a backward follows keeps them all
(options.keep_gate_operands), so the backward runs no pre-pass of its own; in SP the state pass's kd goes on to the output pass. The main kernels
then read them as the no-decay kernels read q and k, with no `[C, K]` gate tile, cumulative sum or exps of
their own: that kept their chunks at 32 tokens, where Triton's dots compile to mma.sync instead of Hopper's
wgmma (docs/benchmarks.md). The scale is exp(min(−b_C, LEVEL_SPAN)) (c = 0, level 0): exact while the chunk
total stays above −LEVEL_SPAN, which is every chunk of ordinary gates. The pre-pass marks the segments where a
key's gate falls further inside a chunk, and `_levels_kernel` then adds, for those chunks, the exact terms:
level 0 on the tokens above −LEVEL_SPAN and levels with reference c = the largest b not yet taken, each a matmul
over the tokens in (c − LEVEL_SPAN, c], minus what the main kernels' factor gave that key (`_level0_factor`: on a
key that steep, exp(LEVEL_SPAN − (b − b_C)), taken back whole). Every factor stays within [−exp(LEVEL_SPAN),
exp(LEVEL_SPAN)], so no gate overflows: a steep fall costs matmuls, not correctness (a single factorisation,
exp(b_t)·exp(−b_s), gave NaN once a chunk's gates summed below about −88). Log gates must be ≤ 0 (docs/design.md,
decays).

Full resets: a log gate of −inf (g, scalar or per key) drops the state, S_t = k_t v_tᵀ (packed documents), with
options.resets only. The kernels that form a cumulative gate (state, forward, dq, dk, dv for g; the pre-pass and
_levels_kernel per key) take a constexpr RESETS from it, and branch on it: off (the default) they compile to the
finite-gate arithmetic, which costs finite gates nothing for resets they do not have and gives NaN for −inf
(refused on CPU tensors, and on CUDA under LONGSCAN_CHECKS=1: plan._resets); packed documents turn it on
(chunk_linear_attention, and SP's backend for every piece). With RESETS, where the cumulative gate is formed it
is taken with −inf as 0, beside a count of the resets so far (_scalar_cumulative, _key_cumulative): the decay
from s to t is exp(b_t − b_s) where the counts at s and t agree and 0 (a select) where they differ, so no
(−inf) − (−inf) arises; a chunk's or segment's total is −inf past a reset, which the scans take as a decay of 0.
Scalar gates select in each main kernel and the state pass, only in the chunks that hold a reset (whose gates sum
to −inf: a branch uniform over a program, common._chunk_decays); the others run the finite-gate arithmetic. Per key
the pre-pass selects: qd is 0 from a key's first reset in the
chunk on, kd before its last, its total −inf; those level-0 scores are then 0 on every causal pair, and
_levels_kernel visits the chunk (marked in steep_chunks) and adds its scores per reset span (the counts are per
key, so −inf on only some keys of a token is exact too). The gradient of a −inf gate is 0 (scalar: exactly; per
key: to round-off). benchmarks/tuning/ptx_diff.py checks both: RESETS off against the kernels before resets,
on (--resets) against a reset-capable revision.

Gradient of the gate (A_t the cumulative log gate): dL/dA_t = q_t⊙dq_t − k_t⊙dk_t, plus Σ_v S_T⊙dS_T at the
last step; dg_s = Σ_{t≥s} dL/dA_t. The dq and dk kernels emit the q and k sides. Scalar gates: the host sums
them, each segment's sums restarted from dg at the next segment's first token, a product of states
(_anchored_suffix_sums; the round-off of a sum over every later token grew with T). Per-key gates: the dk
kernel, walking backward, carries the sums across chunks and takes them inside each chunk (a reverse sum over
the chunk's tile, its rows held in runs of DG_RUN consecutive tokens a thread so that the sum is mostly adds in
registers: _dg_suffix_sums); across segments the dk kernel needs no other
segment's sums, since dg at a segment's first token is also Σ_v exp(g_s)S_{s−1}⊙dS_s, a product of the prefix state and the state gradient
that the backward already holds. A learnable g_gamma's gradient is not this sum over its tokens but a
forward-mode kernel of its own beside the others (gamma_grad.py says why).

Shapes: q, k `[B, T, H, K]`, v `[B, T, H, V]`; states `[B, H, K, V]` float32. K, V ∈ {16, 32, 64, 128}.
"""
from __future__ import annotations

import dataclasses

import torch
import triton

from longscan.kernels import trace
from longscan.kernels.linear_attention.options import LinearKernelOptions, resolve
from longscan.kernels.linear_attention.triton.bwd import run_dk, run_dq, run_dv
from longscan.kernels.linear_attention.triton.fwd import run_forward, run_prefix
from longscan.kernels.linear_attention.triton.gamma_grad import g_gamma_grad
from longscan.kernels.linear_attention.triton.gates import _gate_operands
from longscan.kernels.linear_attention.triton.levels import _add_levels
from longscan.kernels.linear_attention.triton.plan import (_bf16, _check, _gate, _in_bf16, _launch, _prec, _resets,
                                                           _split, _split_scores, _state_products)
from longscan.kernels.linear_attention.triton.records import ForwardRecord, StatePass
from longscan.kernels.linear_attention.triton.state import _kv_states, _scan, _states


def _kernel_operands(q, k, gt, ops):
    """-> (q, k, kd, eq, ek, g) as the main kernels take them: per-key gates (ops) their decayed operands,
    factors and chunk totals (k: the inputs', which no per-key main kernel reads), else the inputs (q stands in
    for what a kind does not read)."""
    if ops is None:
        return q, k, q, q, q, gt
    return ops.qd, k, ops.kd, *(x if x is not None else q for x in (ops.eq, ops.ek)), ops.totals


def _arrived(dht, q):
    """The deferred dht: the function's result, checked as an eager dht is."""
    dht = dht()
    if dht is not None:
        _check(q, dht)
    return dht


def _anchored_suffix_sums(a, seg, anchors, last):
    """Σ_{u≥t} a_u of `[B, T, H]` restarted in every segment of seg tokens from the value at the next segment's
    first token, ``anchors`` `[B, H, ns − 1]` (from the states), and after the last segment from ``last`` `[B, H]`
    (or 0): the per-token terms' round-off then gathers over one segment, not over the whole sequence."""
    B, T, H = a.shape
    ns = anchors.shape[-1] + 1
    x = torch.nn.functional.pad(a, (0, 0, 0, ns * seg - T)).view(B, ns, seg, H).permute(0, 1, 3, 2).contiguous()
    tail = torch.cat([anchors, last.unsqueeze(-1) if last is not None else anchors.new_zeros(B, H, 1)], -1)
    sums = x.flip(-1).cumsum(-1).flip(-1) + tail.transpose(1, 2)[..., None]           # [B, ns, H, seg]
    return sums.permute(0, 1, 3, 2).reshape(B, ns * seg, H)[:, :T]


def _reverse_cumsum(x, dim):
    """Σ_{j ≥ i} x_j along dim. The scan runs over the last dimension of a contiguous copy: torch's scan
    along an outer dimension with few columns (T of [B, T, H]) was far slower on a GPU."""
    y = x.movedim(dim, -1).contiguous()
    return y.flip(-1).cumsum(-1).flip(-1).movedim(-1, dim)


def forward(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
            return_saved=False, kv_states: StatePass | None = None, options: LinearKernelOptions | None = None):
    """-> (o `[B, T, H, V]` in q's dtype, final state `[B, H, K, V]` float32 or None).

    kv_states: this sequence's :class:`StatePass` from :func:`segment_state` (SP computes them first),
    so the forward skips its own state pass. return_saved: also return a :class:`ForwardRecord` with the
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
    resets = _resets(gt, GATE, opts)
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    ht = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    if T == 0:
        if ht is not None:
            ht.copy_(initial_state if initial_state is not None else torch.zeros_like(ht))
        return (o, ht, None) if return_saved else (o, ht)
    BV, cfg = _launch("fwd", V, GATE, q.dtype, opts)
    seg, ns = ((kv_states.seg, kv_states.n) if kv_states is not None else
               _split(B, H, T, V, C, GATE, q.dtype, q.device, opts))
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
        elif not isinstance(kv_states, StatePass):
            raise ValueError("kv_states holds no per-segment states (a forward's saved prefixes are for backward)")
        if h0 is None and ht is None and kv_states.zero_prefixes is not None:
            h0 = kv_states.zero_prefixes
        else:
            h0, final = _scan(kv_states.states, kv_states.log_decays, h0, reverse=False)
            if ht is not None:
                ht.copy_(final)
        saved = ForwardRecord(seg, ns, prefixes=h0)
    else:
        saved = None
    if keep and ops is not None:
        saved = dataclasses.replace(saved if saved is not None else ForwardRecord(seg, ns), operands=ops)
    run_forward(qx=qx, kx=kx, kdx=kdx, v=v, gx=gx, gg=gg, o=o, h0=h0, ht=ht, T=T, H=H, seg=seg, ns=ns, C=C,
                scale=scale, GATE=GATE, BV=BV, store_ht=(ht is not None and ns == 1), prec=_prec(q, opts), resets=resets,
                dummy=q, cfg=cfg)
    if ops is not None:
        _add_levels(0, ops, seg, C, q, k, v, gt, scale, _prec(q, opts), o=o)
    return (o, ht, saved) if return_saved else (o, ht)


def _backward_prefixes(record, h0, state_pass):
    """The states entering each segment, for the backward, from the first source that holds them: the forward's
    prefixes (a ForwardRecord: same initial state), a state pass's prefixes from zero (no initial state), that
    state pass's states scanned from h0, or a fresh state pass (``state_pass()``) scanned from h0."""
    if isinstance(record, ForwardRecord) and record.prefixes is not None:
        return record.prefixes
    if isinstance(record, StatePass) and record.zero_prefixes is not None and h0 is None:
        return record.zero_prefixes
    kv = record if isinstance(record, StatePass) else state_pass()
    return _scan(kv.states, kv.log_decays, h0, reverse=False)[0]


def backward(q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True,
             kv_states: ForwardRecord | StatePass | None = None, qdo_states: StatePass | None = None,
             options: LinearKernelOptions | None = None):
    """-> (dq, dk, dv, dg, dh0): dg in the shape of g (or of g_gamma `[H]`; None without decay or when
    not need_dg), dh0 `[B, H, K, V]` float32 even when initial_state is None. kv_states / qdo_states: the
    records of these inputs: a :class:`ForwardRecord` from ``forward(..., return_saved=True)`` (same initial_state: its
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
    if g_gamma is not None and need_dg:
        # A learnable constant decay: the kernels without the gate gradient, then that gradient in forward mode
        # (gamma_grad says why not the per-token sum), given the dht the kernels waited for
        arrived = [dht]

        def arrive():
            arrived[0] = _arrived(dht, q)
            return arrived[0]
        dq, dk, dv, _, dh0 = backward(q, k, v, g, g_gamma, scale, initial_state, do, arrive if deferred else dht,
                                      False, kv_states, qdo_states, options=opts)
        dgam = g_gamma_grad(q, k, v, g_gamma, scale, initial_state, do, arrived[0])
        return dq, dk, dv, dgam.to(g_gamma.dtype), dh0
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous().to(q.dtype)
    trace.emit("backward", dtype=q.dtype)
    GATE, gt, gg, C = _gate(g, g_gamma, q, opts)
    resets = _resets(gt, GATE, opts)
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
    (BK, cq), (BKk, ck), (BV, cv) = (_launch("dq", K, GATE, q.dtype, opts), _launch("dk", K, GATE, q.dtype, opts),
                                     _launch("dv", V, GATE, q.dtype, opts))
    given = [x for x in (kv_states, qdo_states) if x is not None]
    seg, ns = (given[0].seg, given[0].n) if given else _split(B, H, T, V, C, GATE, q.dtype, dev, opts)
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
        h0 = _backward_prefixes(kv_states, h0,
                                lambda: _kv_states(kdx if ops else k, v, gx, gg, GATE, C, seg, ns, opts))
        if qdo_states is None:
            qdo_states = StatePass(seg, *_states(qx, do, gx, gg, GATE, C, seg, ns, scale, True, opts))
    prec = _prec(q, opts)
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
    common = dict(K=K, V=V, C=C, GATE=GATE, PREC=prec, RESETS=resets)
    NC = triton.cdiv(T, C)
    run_dq(qx=qx, kx=kx, kdx=kdx, eqx=eqx, v=v, gx=gx, gg=gg, do=do, h0=h0, dq=dq, gq=gq, st=st, T=T, H=H,
           seg=seg, ns=ns, NC=NC, scale=scale, BK=BK, need_dg=need_dg, sf32=sf32["dq"], sprec=sprec["dq"],
           split=_split_scores(GATE, q.dtype, need_dg, opts), dummy=dummy, common=common, cfg=cq)
    trace.emit("bwd_dq")
    if deferred:
        dht = _arrived(dht, q)
    term = (st * dht).sum(-1) if st is not None and dht is not None else None   # [B, H, K]
    dhe = dht.contiguous() if dht is not None else None
    if ns > 1:
        # the gradient of the state leaving each segment (dht past the last): a reverse scan of the (q, do) states
        dhe, _ = _scan(qdo_states.states, qdo_states.log_decays, dhe, reverse=True)
    if ops is not None:   # before the dk kernel, which takes the gate gradient on from gq
        _add_levels(1, ops, seg, C, q, k, v, gt, scale, prec, do=do, dq=dq, gq=gq, need_dg=need_dg)
    run_dk(qx=qx, kx=kx, kdx=kdx, ekx=ekx, v=v, gx=gx, gg=gg, do=do, dhe=dhe, hin=h0 if ns > 1 else None, dk=dk,
           gk=gk, dg=gq if GATE == 3 and need_dg else None, term=term, dh0=dh0, T=T, H=H, seg=seg, ns=ns, NC=NC,
           scale=scale, BK=BKk, need_dg=need_dg, sf32=sf32["dk"], sprec=sprec["dk"], dummy=dummy, common=common,
           cfg=ck)
    run_dv(qx=qx, kx=kx, kdx=kdx, gx=gx, gg=gg, do=do, dhe=dhe, dv=dv, T=T, H=H, seg=seg, ns=ns, NC=NC,
           scale=scale, BV=BV, dummy=dummy, common=common, cfg=cv)
    if ops is not None:
        _add_levels(2, ops, seg, C, q, k, v, gt, scale, prec, do=do, dk=dk, dv=dv)
    if not need_dg:
        return dq, dk, dv, None, dh0
    # The first token's gate multiplies the initial state: its dg is ⟨dh0, h0⟩ (per key: over V), two float32
    # states, where the kernels form it from every token's q-side minus k-side terms, which cancel (without an
    # initial state, where it is exactly 0, only to round-off)
    first = (dh0 * initial_state.float()).sum(-1) if initial_state is not None else None    # [B, H, K]
    if GATE == 3:
        gq[:, 0] = first if first is not None else 0
        return dq, dk, dv, gq.to(g.dtype), dh0
    # scalar gates: dL/dA_t = Σ_tiles (q-side − k-side); dg_s = Σ_{t≥s} dL/dA_t (+ the final-state term)
    a = gq.sum(-1) - gk.sum(-1)                                                      # [B, T, H]
    last = term.sum(-1) if term is not None else None                                 # [B, H]
    if ns > 1 and not resets:
        # dg at segment j+1's first token is also ⟨dS leaving segment j, S entering segment j+1⟩
        dgl = _anchored_suffix_sums(a, seg, (dhe[:, :, :-1] * h0[:, :, 1:]).sum((-1, -2)), last)
    else:
        dgl = _reverse_cumsum(a, 1)
        if last is not None:
            dgl = dgl + last.unsqueeze(1)
    dgl[:, 0] = first.sum(-1) if first is not None else 0
    if resets:
        # a −inf gate (a full reset) multiplies the state by 0 whatever it is: its gradient is 0 (torch's and the
        # recurrence's value), which the sum above forms only to round-off
        dgl.masked_fill_(g == float("-inf"), 0)
    return dq, dk, dv, dgl.to(g.dtype), dh0   # (g_gamma's gradient took the forward-mode path above)


def segment_state(k, v, g=None, g_gamma=None, return_saved=False, keep_prefixes=False, q=None, factors=False,
                  options: LinearKernelOptions | None = None):
    """A segment's state from zero and its total log decay.

    -> (S `[B, H, K, V]` float32, log_decay `[B, H, K]` float32), S = Σ_t exp(A_T - A_t) ⊙ k_t v_tᵀ, and with
    return_saved the per-segment :class:`StatePass` (or None) for ``forward(..., kv_states=...)`` (per-key
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
    _resets(gt, GATE, opts)
    if T == 0:
        out = (torch.zeros(B, H, K, V, device=k.device, dtype=torch.float32),
               torch.zeros(B, H, K, device=k.device, dtype=torch.float32))
        return out + (None,) if return_saved else out
    seg, ns = _split(B, H, T, V, C, GATE, k.dtype, k.device, opts)
    ops = None
    if GATE == 3:   # the state reads the decayed keys
        with_q = return_saved and q is not None
        ops = _gate_operands(q.contiguous() if with_q else None, k, gt, C, seg, ns, opts, factors=with_q and factors)
        k, gt = ops.kd, ops.totals
    kv = _kv_states(k, v, gt, gg, GATE, C, seg, ns, opts)
    kv = dataclasses.replace(kv, operands=ops if return_saved else None)
    total = kv.log_decays.sum(2)
    if ns == 1:
        out = (kv.states[:, :, 0], total)
        return out + (kv if ops is not None else None,) if return_saved else out
    keep = return_saved and keep_prefixes
    prefixes, final = _scan(kv.states, kv.log_decays, None, reverse=False, store_out=keep)
    if not return_saved:
        return final, total
    return final, total, dataclasses.replace(kv, zero_prefixes=prefixes if keep else None)


def prefix_grad(q, g, g_gamma, scale, do, return_saved=False, kv_states: ForwardRecord | None = None,
                options: LinearKernelOptions | None = None):
    """Gradient of the segment's outputs w.r.t. its entering state: scale·Σ_t (q_t⊙exp(A_t)) do_tᵀ, float32
    `[B, H, K, V]`; with return_saved also the per-segment :class:`StatePass` for
    ``backward(..., qdo_states=...)`` (one segment too: its ``log_decays`` sum to the sequence's total log gate,
    which SP needs beside this gradient). kv_states: the forward's :class:`ForwardRecord` of these inputs, whose
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
    _resets(gt, GATE, opts)
    if T == 0:
        out = torch.zeros(B, H, K, V, device=q.device, dtype=torch.float32)
        empty = StatePass(0, out.unsqueeze(2), torch.zeros(B, H, 1, K, device=q.device, dtype=torch.float32))
        return (out, empty) if return_saved else out
    seg, ns = ((kv_states.seg, kv_states.n) if kv_states is not None else
               _split(B, H, T, V, C, GATE, q.dtype, q.device, opts))
    if GATE == 3:   # the state reads the decayed queries
        ops = kv_states.operands if kv_states is not None else None
        if ops is None or ops.qd is None:
            ops = _gate_operands(q, None, gt, C, seg, ns, opts)
        q, gt = ops.qd, ops.totals
    qdo = StatePass(seg, *_states(q, do, gt, gg, GATE, C, seg, ns, scale, True, opts))
    if ns == 1:
        return (qdo.states[:, :, 0], qdo) if return_saved else qdo.states[:, :, 0]
    _, final = _scan(qdo.states, qdo.log_decays, None, reverse=True, store_out=False)
    return (final, qdo) if return_saved else final


def add_prefix(o, q, g, g_gamma, scale, P, options: LinearKernelOptions | None = None):
    """o + scale·(q ⊙ exp(A))ᵀ P in one pass over (o, q): the output correction for a segment entered with
    state P `[B, H, K, V]` (A the segment-inclusive cumulative log gate). Returns a new tensor like o."""
    _check(q, o, P)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    opts = resolve(options)
    q, o, P = q.contiguous(), o.contiguous(), P.contiguous()
    GATE, gt, gg, C = _gate(g, g_gamma, q, opts)
    _resets(gt, GATE, opts)
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
        # the exclusive sum as a shifted cumulative one: subtracting each chunk's own sum gives NaN past a −inf
        goff = torch.nn.functional.pad(sums[:, :-1], (0, 0, 0, 0, 1, 0)).cumsum(1).contiguous()
    run_prefix(o=o, q=q, gt=gt, gg=gg, goff=goff, P=P, out=out, T=T, H=H, N=N, C=C, scale=scale, GATE=GATE,
               prec=_prec(q, opts))
    return out


class TritonBackend:
    """The Triton kernels behind the local-compute contract (longscan.kernels.linear_attention.backend), with
    their options. Its records are :class:`StatePass` (segment_state, prefix_grad) and :class:`ForwardRecord`
    (forward)."""
    name = "triton"
    # g_gamma's gradient in forward mode beside the kernels (gamma_grad.py)
    supports_g_gamma_grad = True

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
        # the backward's gate factors are written only where the forward will keep them for it
        return segment_state(k, v, g, g_gamma, return_saved=True, keep_prefixes=zero_prefixes, q=q,
                             factors=keep and self.options.keep_gate_operands, options=self.options)

    def add_prefix(self, o, q, g, g_gamma, scale, P):
        return add_prefix(o, q, g, g_gamma, scale, P, options=self.options)

    def prefix_grad(self, q, g, g_gamma, scale, do, *, saved=None):
        dP, qdo = prefix_grad(q, g, g_gamma, scale, do, return_saved=True, kv_states=saved, options=self.options)
        # the state pass's own totals: a second reduction over g would read all of it again
        return dP, qdo.log_decays.sum(2), qdo



__all__ = ["forward", "backward", "segment_state", "add_prefix", "prefix_grad", "StatePass", "ForwardRecord",
           "LinearKernelOptions", "TritonBackend"]
