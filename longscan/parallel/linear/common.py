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
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from longscan.distributed.layouts import check_layout, group_rank_size, num_segments, segment_owner
from longscan.distributed.stats import count, nbytes, waiting
from longscan.kernels import saved
from longscan.kernels.linear_attention import (LinearBackend, LinearKernelOptions, check_backend_supports,
                                               check_documents, check_inputs, get_backend, with_resets)
from longscan.kernels.linear_attention.backend import log_decay


# The linear SP methods' names (the registry in longscan.parallel.linear holds one LinearSPMethod for each).
METHODS = ("zeco", "lasp2", "lasp1")


@dataclass(frozen=True)
class SegmentGroup:
    """The SP group, its layout and this rank's place in it: what every SP operator's scan needs."""
    group: object
    layout: str
    rank: int
    world: int
    n_local: int

    @property
    def first_owner(self) -> int:
        """Rank holding global segment 0 (where initial_state enters); its slot there is 0."""
        return segment_owner(0, self.world, self.layout)[0]

    @property
    def last_owner(self) -> int:
        """Rank holding the last global segment (where the final state leaves)."""
        return segment_owner(num_segments(self.world, self.layout) - 1, self.world, self.layout)[0]


@dataclass(frozen=True)
class SPContext(SegmentGroup):
    """What every SP method needs to know about the group and the local compute (fixed for one call)."""
    scale: float
    impl: LinearBackend
    n_blocks: int = 4
    overlap: bool = False


def split(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """`[B, T, ...]` -> `[B·n, T/n, ...]`: the n equal segments of each local sequence as sequences of their
    own, batch-major. A view of a contiguous x (stacking segment-major took a copy of every input and
    output: a large part of the zigzag step at long local lengths)."""
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


def make_context(q, k, v, g, g_gamma, scale, initial_state, group, layout, backend, n_blocks, overlap=True,
                 options: LinearKernelOptions | None = None, cu_seqlens=None,
                 output_final_state: bool = False) -> SPContext:
    """Validate everything and build the SPContext (ValueError/TypeError naming the parameter). cu_seqlens:
    packed documents (``check_documents``: initial_state is then one state per document)."""
    documents = cu_seqlens is not None
    check_layout(layout)
    check_inputs(q, k, v, g, g_gamma, None if documents else initial_state)
    if documents:
        check_documents(q, initial_state, output_final_state, backend, cu_seqlens=cu_seqlens)
        if initial_state is not None and initial_state.device != q.device:
            raise ValueError(f"initial_state must be on q's device ({q.device}), got {initial_state.device}")
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
    # documents enter as -inf gates (run_documents): the backend, which every SP piece calls (segment_state,
    # forward, add_prefix, prefix_grad, backward), is built with options.resets on (Triton's reset arithmetic)
    impl = get_backend(backend, q.device, with_resets(options) if documents else options)
    check_backend_supports(impl, g_gamma)
    if documents:
        check_documents(q, initial_state, output_final_state, backend, impl, cu_seqlens=cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return SPContext(group, layout, rank, world, n_local, scale, impl, n_blocks, overlap)


class MethodForward(Protocol):
    def __call__(self, sp: SPContext, q, k, v, g, g_gamma, initial_state, output_final_state: bool,
                 keep: bool, extra=None) -> tuple:
        """-> (o, final | None, P `[n_local, B, H, K, V]` the states entering the local segments, the local
        forward's record for the backward or None). extra: None, or `[n_local, B, H, K, V]` added to the states
        the local segments leave before the scan (packed documents' initial states)."""


class MethodBackward(Protocol):
    def __call__(self, sp: SPContext, q, k, v, g, g_gamma, P, do, dfinal, record, dP_out=None) -> tuple:
        """-> (dq, dk, dv, dgate, dh0, R): R `[n_local, B, H, K, V]` the gradient of the states the local
        segments leave (that of ``extra``). dP_out: None, or a gradient of P from outside the method, added to
        the one from the local outputs before the reverse scan."""


@dataclass(frozen=True)
class LinearSPMethod:
    """One linear SP method: its name, forward and backward, and whether it pipelines K blocks (n_blocks)."""
    name: str
    forward: MethodForward
    backward: MethodBackward
    uses_blocks: bool = False


class SPLinearAttentionFunction(torch.autograd.Function):
    """Autograd for every linear SP method; the method supplies its forward and backward.

    Outputs (o, final | None, P): P `[n_local, B, H, K, V]`, the states entering the local segments, for
    callers that read states inside the sequence (packed documents' final states); its gradient joins the scan's.
    extra (None or `[n_local, B, H, K, V]`): added to the states the local segments leave (see MethodForward)."""

    @staticmethod
    def forward(ctx, method: LinearSPMethod, sp, q, k, v, g, g_gamma, initial_state, output_final_state,
                extra=None):
        o, final, P, record = method.forward(sp, q, k, v, g, g_gamma, initial_state, output_final_state,
                                             any(ctx.needs_input_grad), extra)
        # the local forward's record kept as saved tensors until the backward, so that activation checkpointing
        # frees them too (longscan.kernels.saved)
        kept, ctx.record = saved.pack(record)
        ctx.save_for_backward(q, k, v, g, g_gamma, P, initial_state, *kept)
        ctx.method, ctx.sp, ctx.output_final_state = method, sp, output_final_state
        ctx.has_extra = extra is not None
        # unused outputs (P, mostly) get None, not a zero tensor to add into the scan
        ctx.set_materialize_grads(False)
        return o, final, P

    @staticmethod
    def backward(ctx, do, dfinal, dP):
        q, k, v, g, g_gamma, P, h0, *kept = ctx.saved_tensors
        if not ctx.output_final_state:
            dfinal = None
        if do is None:
            do = torch.zeros_like(v)
        record = saved.unpack(kept, ctx.record)
        dq, dk, dv, dgate, dh0, R = ctx.method.backward(ctx.sp, q, k, v, g, g_gamma, P, do, dfinal, record, dP)
        return (None, None, dq, dk, dv,
                dgate if g is not None else None, dgate if g_gamma is not None else None,
                dh0.to(h0.dtype) if h0 is not None else None, None, R if ctx.has_extra else None)


def run_method(method: LinearSPMethod, q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
               output_final_state=False, group=None, layout="contiguous", backend="auto", n_blocks=4,
               overlap=False, options: LinearKernelOptions | None = None):
    """Validate, then run ``method`` under autograd (n_blocks only where the method pipelines blocks). Packed
    documents: ``longscan.parallel.linear.documents.run_documents``."""
    sp = make_context(q, k, v, g, g_gamma, scale, initial_state, group, layout, backend,
                      n_blocks if method.uses_blocks else 1, overlap, options)
    return SPLinearAttentionFunction.apply(method, sp, q, k, v, g, g_gamma, initial_state, output_final_state)[:2]


def segment_inputs(sp: SPContext, q, k, v, g, do=None):
    """The local tensors as stacked segments (see :func:`split`)."""
    n = sp.n_local
    return split(q, n), split(k, n), split(v, n), split(g, n), split(do, n)


Collective = Callable[[torch.Tensor, torch.Tensor], tuple]


def _leaving(S: torch.Tensor, n: int, extra) -> torch.Tensor:
    """The states the local segments leave, segment-major, with ``extra`` added (see MethodForward)."""
    S = by_segment(S, n)
    return S if extra is None else S + extra.to(S.dtype)


def forward_from_prefix(sp: SPContext, qs, ks, vs, gs, g_gamma, collective: Collective, keep: bool, extra=None):
    """The default schedule: a state-only pass, the collective, then the output pass from the entering state P
    (no correction pass, but nothing hides the collective). The output pass takes the state pass's record (per-key
    gates: the gate operands its pre-pass wrote), and its own record (its segment prefixes from P, which the
    backward takes as its h0) goes to the backward. -> (o, the collective's result, record)."""
    n = sp.n_local
    # with qs: per-key gates' pre-pass writes the output pass's operands too (and the backward's with keep)
    S, logd, kv = sp.impl.segment_state(ks, vs, gs, g_gamma, q=qs, keep=keep, zero_prefixes=False)
    result = collective(_leaving(S, n, extra), by_segment(logd, n))
    o, _, record = sp.impl.forward(qs, ks, vs, gs, g_gamma, sp.scale, by_batch(result[0]), False, keep=keep,
                                   saved=kv)
    return o, result, record


def forward_overlapped(sp: SPContext, qs, ks, vs, gs, g_gamma, collective: Collective, keep: bool, extra=None):
    """``overlap=True``: the output pass from zero, then the correction o += scale·(q⊙exp(A)) P (one more pass
    over q and o). On CUDA a state-only pass comes first and the collective runs on a side stream beside the
    output pass; elsewhere (gloo blocks the host, nothing would overlap) one pass gives the zero-prefix output and
    the state together, then the collective. From zero only the record's gate operands hold for the backward
    (its prefixes are not the segments' entering states). -> (o, the collective's result, record)."""
    n = sp.n_local
    if qs.device.type == "cuda":
        S, logd, kv = sp.impl.segment_state(ks, vs, gs, g_gamma, q=qs, keep=keep, zero_prefixes=True)
        leaving = _leaving(S, n, extra)     # on the main stream, which joins the side stream before it is freed
        with comm_stream(qs.device) as stream:
            result = collective(leaving, by_segment(logd, n))
        o, _, record = sp.impl.forward(qs, ks, vs, gs, g_gamma, sp.scale, None, False, keep=keep, saved=kv)
        join_stream(stream, *[t for t in result if t is not None])
    else:
        o, S, record = sp.impl.forward(qs, ks, vs, gs, g_gamma, sp.scale, None, True, keep=keep)
        B, T_seg, H, K = qs.shape
        logd = log_decay(gs, g_gamma, T_seg, (B, H, K), S.dtype, qs.device)
        result = collective(_leaving(S, n, extra), by_segment(logd, n))
    if record is not None:
        record = record.operands_only()
    return sp.impl.add_prefix(o, qs, gs, g_gamma, sp.scale, by_batch(result[0])), result, record


def local_pass(sp: SPContext, qs, ks, vs, gs, g_gamma, collective: Collective, keep: bool, extra=None):
    """Every local segment's output, and ``collective(S_loc, log_decay)`` on their states, by the schedule
    ``sp.overlap`` names (:func:`forward_from_prefix`, :func:`forward_overlapped`).

    qs, ks, vs, gs are stacked segments (:func:`segment_inputs`); ``collective`` gets `[n_local, B, H, K, V]`
    states and `[n_local, B, H, K]` log decays and returns a tuple whose first entry is P `[n_local, B, H, K,
    V]`, the states entering the local segments. keep: a backward follows (the local forward then keeps what
    it can reuse). extra: None, or `[n_local, B, H, K, V]` added to the states the segments leave.
    -> (o `[B·n_local, T/n_local, H, V]`, the collective's result, the record for the backward).
    """
    schedule = forward_overlapped if sp.overlap else forward_from_prefix
    return schedule(sp, qs, ks, vs, gs, g_gamma, collective, keep, extra)


def reverse_beside_dq(device, run):
    """Launch ``run()``, the reverse collective, on the comm stream (CUDA) and return a function that makes
    the main stream wait for it and gives its result, R `[n_local, B, H, K, V]`. :func:`local_backward`
    hands that function to the backend as dht, which calls it as late as it can (Triton: after launching its dq
    kernel, which needs P, not R): the collective runs beside the dq kernel, at no extra work. Off CUDA ``run``
    completes here (gloo blocks the host)."""
    with comm_stream(device) as stream:
        R = run()

    def arrived():
        join_stream(stream, R)
        return R
    return arrived


def local_backward(sp: SPContext, q, k, v, g, g_gamma, P, do, R, qdo, record):
    """The local backward once the SP scan has given every segment its entering state P and the
    gradient R of its leaving state (or a function that returns R: :func:`reverse_beside_dq`):
    -> (dq, dk, dv, dgate, dh0, R) with dgate shaped like g (or g_gamma), dh0 the gradient of
    initial_state (non-zero only on the rank holding global segment 0, so the sum over ranks is the
    single-device gradient) and R resolved. qdo: what :func:`prefix_grads` computed; record: the local
    forward's."""
    n = sp.n_local
    need_dg = any(x is not None and x.requires_grad for x in (g, g_gamma))
    qs, ks, vs, gs, dos = segment_inputs(sp, q, k, v, g, do)
    dht = (lambda: by_batch(R())) if callable(R) else by_batch(R)
    dq, dk, dv, dgate, dh0 = sp.impl.backward(qs, ks, vs, gs, g_gamma, sp.scale, by_batch(P), dos, dht, need_dg,
                                              saved=record, qdo=qdo)
    dh0 = by_segment(dh0, n)[0].contiguous() if sp.rank == sp.first_owner else torch.zeros_like(P[0])
    return (merge(dq, n), merge(dk, n), merge(dv, n),
            (merge(dgate, n) if g is not None and dgate is not None else dgate), dh0, R() if callable(R) else R)


def prefix_grads(sp: SPContext, q, g, g_gamma, do, record):
    """Per segment: the gradient of its outputs w.r.t. its entering state `[n_local, B, H, K, V]`, its
    total log decay `[n_local, B, H, K]` (the inputs of the reverse scan), and the backend's record of this
    pass for :func:`local_backward` (None where the backend keeps none). record: the local forward's."""
    n = sp.n_local
    qs, gs, dos = split(q, n), split(g, n), split(do, n)
    dP, logd, qdo = sp.impl.prefix_grad(qs, gs, g_gamma, sp.scale, dos, saved=record)
    return by_segment(dP, n), by_segment(logd, n), qdo
