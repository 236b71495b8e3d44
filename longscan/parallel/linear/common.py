"""Pieces shared by the linear SP methods: segment views of the local tensors, the comm stream, checks.

A rank holds ``n_local`` segments of the global sequence (1 for contiguous, 2 for zigzag). Its segments
are equal in length, so each sequence's become sequences of their own, batch-major, and one kernel call
serves them all: `[B, T, H, D]` -> `[B·n_local, T/n_local, H, D]` (row b·n_local + s: segment s of sequence
b), a view, no copy. A state `[B·n_local, H, K, V]` views as `[n_local, B, H, K, V]` (segment-major, what the
collectives take) through :func:`by_segment`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longscan.distributed.layouts import check_layout, group_rank_size, num_segments, segment_owner
from longscan.distributed.stats import count, nbytes, waiting
from longscan.kernels import saved
from longscan.kernels.linear_attention import check_backend_supports, check_inputs, get_backend

METHODS = ("zeco", "lasp2", "lasp1")


@dataclass
class SPContext:
    """What every SP method needs to know about the group and the local compute."""
    group: object
    layout: str
    rank: int
    world: int
    n_local: int
    scale: float
    impl: object
    n_blocks: int = 4
    overlap: bool = False
    # set by the autograd op: whether a backward will come (the local forward then keeps what it can reuse)
    backward_follows: bool = False
    # what the local forward hands the local backward: the Triton kernels' SegmentStates (per-key gate
    # operands; segment prefixes when the forward ran from P), or None; set from local_pass until the
    # autograd op takes it, and again during the backward
    reuse: object = None

    @property
    def first_owner(self) -> int:
        """Rank holding global segment 0 (where initial_state enters); its slot there is 0."""
        return segment_owner(0, self.world, self.layout)[0]

    @property
    def last_owner(self) -> int:
        """Rank holding the last global segment (where the final state leaves)."""
        return segment_owner(num_segments(self.world, self.layout) - 1, self.world, self.layout)[0]


def split(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """`[B, T, ...]` -> `[B·n, T/n, ...]`: the n equal segments of each local sequence as sequences of their
    own, batch-major. A view of a contiguous x (stacking segment-major took a copy of every input and
    output: at 65,536 local tokens that was a third of the zigzag step on an H100)."""
    if x is None or n == 1:
        return x
    return x.reshape((x.shape[0] * n, x.shape[1] // n) + tuple(x.shape[2:]))


def merge(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Inverse of :func:`split` (a view)."""
    if x is None or n == 1:
        return x
    return x.reshape((x.shape[0] // n, x.shape[1] * n) + tuple(x.shape[2:]))


def by_segment(x: torch.Tensor, n: int) -> torch.Tensor:
    """A per-sequence tensor of the split batch, `[B·n, ...]` -> `[n, B, ...]` (a view)."""
    return x.view((-1, n) + tuple(x.shape[1:])).transpose(0, 1)


def by_batch(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`by_segment`: `[n, B, ...]` -> `[B·n, ...]`, contiguous (a state-sized copy at most)."""
    return x.transpose(0, 1).reshape((-1,) + tuple(x.shape[2:]))


def log_decay(g_seg, g_gamma, T_seg: int, shape_bhk, dtype, device) -> torch.Tensor:
    """Total log decay A_T `[n·B, H, K]` of each segment, from split gates (zeros without decay)."""
    if g_gamma is not None:
        return (T_seg * g_gamma.to(dtype)).view(1, -1, 1).expand(shape_bhk).contiguous()
    if g_seg is None:
        return torch.zeros(shape_bhk, dtype=dtype, device=device)
    total = g_seg.to(dtype).sum(1)
    return (total.unsqueeze(-1) if g_seg.dim() == 3 else total).expand(shape_bhk).contiguous()


_comm_streams: dict = {}


@contextmanager
def comm_stream(device: torch.device):
    """On CUDA, run the enclosed communication on a side stream so it overlaps the local kernels launched
    after it on the main stream; elsewhere a no-op (gloo ops block the host anyway)."""
    if device.type != "cuda":
        yield None
        return
    stream = _comm_streams.setdefault(device, torch.cuda.Stream(device))
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield stream


def join_stream(stream, *tensors) -> None:
    """Make the main stream wait for ``stream`` and keep its tensors alive for the main stream's use."""
    if stream is None:
        return
    main = torch.cuda.current_stream(stream.device)
    main.wait_stream(stream)
    for t in tensors:
        if t is not None:
            t.record_stream(main)


def broadcast_from(x: torch.Tensor | None, src: int, like: torch.Tensor, sp: SPContext) -> torch.Tensor:
    """``x`` from group rank ``src`` on every rank (``like`` gives shape/dtype where x is None)."""
    if sp.world == 1:
        return x
    buf = x.contiguous() if sp.rank == src else torch.empty_like(like)
    count(sent=nbytes(buf) if sp.rank == src else 0, recv=0 if sp.rank == src else nbytes(buf),
          kind="state_broadcast")
    with waiting("state_broadcast"):
        dist.broadcast(buf, dist.get_global_rank(sp.group, src) if sp.group is not None else src, group=sp.group)
    return buf


def all_reduce_sum(x: torch.Tensor, sp: SPContext) -> torch.Tensor:
    """The sum of x over the group's ranks, in a new tensor: x itself is left as it is (it may be a gradient
    the caller still holds)."""
    if sp.world > 1:
        x = x.clone(memory_format=torch.contiguous_format)
        ring = 2 * (sp.world - 1) * nbytes(x) // sp.world
        count(sent=ring, recv=ring, kind="state_all_reduce")
        with waiting("state_all_reduce"):
            dist.all_reduce(x, group=sp.group)
    return x


def make_context(q, k, v, g, g_gamma, scale, initial_state, method, group, layout, backend,
                 n_blocks, overlap=True) -> SPContext:
    """Validate everything and build the SPContext (ValueError/TypeError naming the parameter)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_layout(layout)
    check_inputs(q, k, v, g, g_gamma, initial_state)
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be True or False, got {overlap!r}")
    if not isinstance(n_blocks, int) or not 1 <= n_blocks <= q.shape[-1]:
        raise ValueError(f"n_blocks must be an int in [1, K={q.shape[-1]}], got {n_blocks!r}")
    rank, world = group_rank_size(group)
    n_local = num_segments(world, layout) // world
    T = q.shape[1]
    if layout == "zigzag" and T % 2:
        raise ValueError(f"layout='zigzag' needs an even local length q.shape[1], got {T}")
    if T == 0:
        raise ValueError("q.shape[1] (the local length) must be positive")
    impl = get_backend(backend, q.device)
    check_backend_supports(impl, g_gamma)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return SPContext(group, layout, rank, world, n_local, scale, impl, n_blocks, overlap)


class SPLinearAttentionFunction(torch.autograd.Function):
    """Autograd for every linear SP method; the method supplies its forward and backward.

    ``method_forward(sp, q, k, v, g, g_gamma, h0, output_final_state) -> (o, final | None, P)`` where P
    `[n_local, B, H, K, V]` holds the states entering the local segments (kept for backward);
    ``method_backward(sp, q, k, v, g, g_gamma, P, do, dfinal) -> (dq, dk, dv, dgate, dh0)``.
    """

    @staticmethod
    def forward(ctx, method_forward, method_backward, sp, q, k, v, g, g_gamma, initial_state,
                output_final_state):
        sp.backward_follows = any(ctx.needs_input_grad)
        o, final, P = method_forward(sp, q, k, v, g, g_gamma, initial_state, output_final_state)
        # sp.reuse kept as saved tensors until the backward, so that activation checkpointing frees them too
        # (longscan.kernels.saved)
        kept, ctx.reuse = saved.pack(sp.reuse)
        sp.reuse = None
        ctx.save_for_backward(q, k, v, g, g_gamma, P, initial_state, *kept)
        ctx.method_backward, ctx.sp, ctx.output_final_state = method_backward, sp, output_final_state
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, g_gamma, P, h0, *kept = ctx.saved_tensors
        if not ctx.output_final_state:
            dfinal = None
        ctx.sp.reuse = saved.unpack(kept, ctx.reuse)
        try:
            dq, dk, dv, dgate, dh0 = ctx.method_backward(ctx.sp, q, k, v, g, g_gamma, P, do, dfinal)
        finally:
            ctx.sp.reuse = None
        return (None, None, None, dq, dk, dv,
                dgate if g is not None else None, dgate if g_gamma is not None else None,
                dh0.to(h0.dtype) if h0 is not None else None, None)


def segment_inputs(sp: SPContext, q, k, v, g, do=None):
    """The local tensors as stacked segments (see :func:`split`)."""
    n = sp.n_local
    return split(q, n), split(k, n), split(v, n), split(g, n), split(do, n)


def local_pass(sp: SPContext, qs, ks, vs, gs, g_gamma, collective):
    """Every local segment's output, and ``collective(S_loc, log_decay)`` on their states.

    qs, ks, vs, gs are stacked segments (:func:`segment_inputs`); ``collective`` gets `[n_local, B, H, K, V]`
    states and `[n_local, B, H, K]` log decays and returns a tuple whose first entry is P `[n_local, B, H, K,
    V]`, the states entering the local segments. Three schedules:
      - ``sp.overlap`` on CUDA: a state-only pass, the collective on a side stream beside the zero-prefix
        output pass, then the output correction o += scale·(q⊙exp(A)) P (one more pass over q and o);
      - ``sp.overlap`` elsewhere (gloo blocks the host, nothing would overlap): one pass gives the zero-prefix
        output and the state together, then the collective, then the correction;
      - not ``sp.overlap``: the state-only pass, the collective, then the output pass from the entering
        state P: no correction pass, but nothing hides the collective.
    With the Triton backend the output pass reuses the state pass's per-segment states (per-key gates: the
    gate operands its pre-pass wrote), and when a backward follows, what the backward can reuse goes to
    ``sp.reuse``: the gate operands, and after an output pass from P its segment prefixes.
    -> (o `[B·n_local, T/n_local, H, V]`, the collective's result).
    """
    n = sp.n_local
    keep = reuses_states(sp) and sp.backward_follows

    def local_forward(h0, final_state, kv):
        extra = ({"kv_states": kv} if kv is not None else {}) | ({"return_saved": True} if keep else {})
        out = sp.impl.forward(qs, ks, vs, gs, g_gamma, sp.scale, h0, final_state, **extra)
        if keep:
            # from P (h0 given: the states entering the segments, which the backward takes as its h0) the
            # forward's segment prefixes hold for the backward too, and spare it a state pass and a scan;
            # from zero (the correction adds P) only the gate operands do
            kept = out[2]
            sp.reuse = kept if h0 is not None or kept is None else kept.operands_only()
        return out[:2]

    def state_pass(zero_prefix_next):
        if reuses_states(sp):   # zero_prefix_next: the output pass starts from zero (the correction adds P)
            # with qs: per-key gates' pre-pass writes the output pass's operands too (and the backward's with keep)
            return sp.impl.segment_state(ks, vs, gs, g_gamma, return_saved=True, keep_prefixes=zero_prefix_next,
                                         q=qs, factors=keep)
        return sp.impl.segment_state(ks, vs, gs, g_gamma) + (None,)

    def output_pass(h0, kv):
        return local_forward(h0, False, kv)[0]

    if not sp.overlap:
        S, logd, kv = state_pass(False)
        result = collective(by_segment(S, n), by_segment(logd, n))
        return output_pass(by_batch(result[0]), kv), result
    if qs.device.type == "cuda":
        S, logd, kv = state_pass(True)
        with comm_stream(qs.device) as stream:
            result = collective(by_segment(S, n), by_segment(logd, n))
        o = output_pass(None, kv)
        join_stream(stream, *[t for t in result if t is not None])
    else:
        o, S = local_forward(None, True, None)
        B, T_seg, H, K = qs.shape
        logd = log_decay(gs, g_gamma, T_seg, (B, H, K), S.dtype, qs.device)
        result = collective(by_segment(S, n), by_segment(logd, n))
    return sp.impl.add_prefix(o, qs, gs, g_gamma, sp.scale, by_batch(result[0])), result


def reuses_states(sp: SPContext) -> bool:
    """Whether the backend's passes hand each other their per-segment states (the Triton kernels)."""
    return getattr(sp.impl, "REUSES_SEGMENT_STATES", False)


def reverse_beside_dq(device, run):
    """Launch ``run()``, the reverse collective, on the comm stream (CUDA) and return a function that makes
    the main stream wait for it and gives its result, R `[n_local, B, H, K, V]`. :func:`local_backward`
    hands that function to a backend with ``LATE_DHT`` (Triton), which launches its dq kernel (it needs P,
    not R) before calling it: the collective runs beside the dq kernel, at no extra work. Off CUDA ``run``
    completes here (gloo blocks the host)."""
    with comm_stream(device) as stream:
        R = run()

    def arrived():
        join_stream(stream, R)
        return R
    return arrived


def local_backward(sp: SPContext, q, k, v, g, g_gamma, P, do, R, qdo_states=None):
    """The local backward once the SP scan has given every segment its entering state P and the
    gradient R of its leaving state (or a function that returns R: :func:`reverse_beside_dq`):
    -> (dq, dk, dv, dgate, dh0) with dgate shaped like g (or g_gamma) and dh0 the gradient of
    initial_state (non-zero only on the rank holding global segment 0, so the sum over ranks is the
    single-device gradient). qdo_states: what :func:`prefix_grads` computed."""
    n = sp.n_local
    need_dg = any(x is not None and x.requires_grad for x in (g, g_gamma))
    qs, ks, vs, gs, dos = segment_inputs(sp, q, k, v, g, do)
    extra = {"qdo_states": qdo_states} if qdo_states is not None else {}
    if not callable(R):
        dht = by_batch(R)
    elif getattr(sp.impl, "LATE_DHT", False):
        dht = lambda: by_batch(R())  # noqa: E731  (asked for after the dq kernel's launch)
    else:
        dht = by_batch(R())
    if sp.reuse is not None:   # the local forward's, from this P (local_pass)
        extra["kv_states"] = sp.reuse
    dq, dk, dv, dgate, dh0 = sp.impl.backward(qs, ks, vs, gs, g_gamma, sp.scale, by_batch(P), dos,
                                              dht, need_dg, **extra)
    dh0 = by_segment(dh0, n)[0].contiguous() if sp.rank == sp.first_owner else torch.zeros_like(P[0])
    return (merge(dq, n), merge(dk, n), merge(dv, n),
            (merge(dgate, n) if g is not None and dgate is not None else dgate), dh0)


def prefix_grads(sp: SPContext, q, g, g_gamma, do):
    """Per segment: the gradient of its outputs w.r.t. its entering state `[n_local, B, H, K, V]`, its
    total log decay `[n_local, B, H, K]` (the inputs of the reverse scan), and the backend's per-segment
    states of this pass for :func:`local_backward` (None where the backend does not reuse them)."""
    n = sp.n_local
    qs, gs, dos = split(q, n), split(g, n), split(do, n)
    B, _, H, K = qs.shape
    if reuses_states(sp):
        dP, qdo = sp.impl.prefix_grad(qs, gs, g_gamma, sp.scale, dos, return_saved=True,
                                      **({"kv_states": sp.reuse} if sp.reuse is not None else {}))
        # the state pass's own totals: a second reduction over g would read all of it again (per-key gates:
        # `[B, T, H, K]` float32, 55 µs at 16,384 tokens on an H200)
        logd = qdo.log_decays.sum(2)
    else:
        dP, qdo = sp.impl.prefix_grad(qs, gs, g_gamma, sp.scale, dos), None
        logd = log_decay(gs, g_gamma, qs.shape[1], (B, H, K), dP.dtype, q.device)
    return by_segment(dP, n), by_segment(logd, n), qdo
