"""ZeCO's state relay for the delta rule (``transition="relay"``): each rank applies its segment to the
carry by running its own state pass from it, a block of V columns at a time, so no K×K transition is formed.

The delta rule is column-wise in V: the output's columns o[..., b] and the leaving state's columns S[..., b]
depend only on v[..., b] and the entering state's columns S_in[..., b] (U = (I + A)⁻¹ Diag(β) V, the state
update and the output act on each column alike), while A, its inverse, W and every k/β/g quantity do not
depend on v at all. So the chain of ``longscan.distributed.chain`` carries the state itself:
  forward:  for each V block b: receive S_in[..., b] (initial_state or zeros at global segment 0), run the
            local state pass on v[..., b] from it, send S_out[..., b] to the next segment's rank; the outputs
            come from the same pass;
  backward: the chain in reverse: receive dS_out[..., b] (at the last segment the final state's gradient,
            summed over ranks), run block b's backward, send dS_in[..., b] back; dq, dk, dβ, dg are sums over
            the blocks, dv and dS_in are column-wise.
A rank's work is one local pass (forward and backward) on its tokens; what the relay costs is latency: the
chain runs (hops + n_blocks - 1) block passes one after another. Zigzag's chain visits ranks 0 → W-1 (first
pieces) and W-1 → 0 (second pieces). One state `[K, V]` a hop, as the matrix All-Scan.

The local pass of a block is a :class:`RelayStages`: :class:`AutogradStages` runs any backend's public
forward on the block's columns under autograd (the k/β/g work repeated a block);
``longscan.kernels.delta_rule.triton.wy_relay.WYRelay`` runs the wy kernels' stages with the k/β/g
preparation once a segment.
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from longscan.distributed.chain import chain_scan
from longscan.kernels.delta_rule import TRITON_BACKEND
from longscan.parallel.delta_rule.common import DeltaSPContext
from longscan.parallel.linear.common import all_reduce_sum, broadcast_from

KIND = "delta_relay"   # the bytes' and waits' label for the profiler


def segment(x: torch.Tensor | None, n: int, slot: int) -> torch.Tensor | None:
    """Local segment ``slot`` of `[B, T, ...]` cut into n equal segments, contiguous."""
    if x is None or n == 1:
        return x
    return x.reshape((x.shape[0], n, x.shape[1] // n) + tuple(x.shape[2:]))[:, slot].contiguous()


def join(parts: list, n: int) -> torch.Tensor:
    """Inverse of :func:`segment` over every slot."""
    if n == 1:
        return parts[0]
    return torch.stack(parts, dim=1).flatten(1, 2)


class RelayStages(Protocol):
    """One rank's local pass over its segments (slot: local segment), a block of V columns at a time."""

    def forward_block(self, slot: int, c0: int, c1: int, S_in: torch.Tensor, S_out: torch.Tensor) -> None:
        """Columns c0:c1 of segment ``slot`` from S_in `[B, H, K, c1 - c0]`, its leaving state written into S_out
        (same shape; both views of the chain's V-major carries)."""

    def outputs(self) -> list:
        """o `[B, T_seg, H, V]` of every segment, once every block has run."""

    def backward_block(self, slot: int, c0: int, c1: int, dO: torch.Tensor | None, dS_out: torch.Tensor,
                       dS_in: torch.Tensor) -> None:
        """Block c0:c1 of segment ``slot``'s backward from its output's gradient dO `[B, T_seg, H, V]` (None:
        zero) and dS_out `[B, H, K, c1 - c0]`, the entering state's gradient written into dS_in (same shape)."""

    def grads(self) -> list:
        """(dq, dk, dv, dbeta, dg or None) of every segment, once every block's backward has run."""


class AutogradStages:
    """A block's pass by the backend's public forward on v[..., c0:c1] from the block's entering state, under
    autograd; each block's graph is kept for its backward (``keep``: gradients are wanted).
    segments: (q, k, v, beta, g) of each local segment."""

    def __init__(self, sp: DeltaSPContext, segments: list, keep: bool):
        self.sp, self.keep = sp, keep
        leaf = (lambda x: x.detach().requires_grad_(keep) if x is not None else None)
        self.inputs = [[leaf(x) for x in (q, k, beta, g)] for q, k, _, beta, g in segments]
        self.v = [v.detach() for _, _, v, _, _ in segments]
        self.o = [torch.empty(v.shape, dtype=q.dtype, device=q.device) for q, _, v, _, _ in segments]
        self.graphs: dict = {}
        self.dv = [torch.zeros_like(v) for v in self.v]
        self.sums = [[None] * 4 for _ in segments]   # dq, dk, dbeta, dg a segment, summed over its blocks

    def forward_block(self, slot, c0, c1, S_in, S_out):
        q, k, beta, g = self.inputs[slot]
        # leaves of their own (copies): the chain's buffers and the segment's v are not this graph's to track
        v = self.v[slot][..., c0:c1].clone(memory_format=torch.contiguous_format).requires_grad_(self.keep)
        S_in = S_in.clone(memory_format=torch.contiguous_format).requires_grad_(self.keep)
        with torch.enable_grad() if self.keep else contextlib.nullcontext():
            o, S_T = self.sp.impl.forward(q, k, v, beta, g, self.sp.scale, S_in, True, **self.sp.local_kwargs())
        self.o[slot][..., c0:c1] = o.detach()
        if self.keep:
            self.graphs[(slot, c0)] = (o, S_T, v, S_in)
        S_out.copy_(S_T.detach())

    def outputs(self):
        return self.o

    def backward_block(self, slot, c0, c1, dO, dS_out, dS_in):
        o, S_T, v, S_in = self.graphs.pop((slot, c0))
        do = torch.zeros_like(o) if dO is None else dO[..., c0:c1].to(o.dtype)
        given = [i for i, x in enumerate(self.inputs[slot]) if x is not None]
        grads = torch.autograd.grad((o, S_T), [self.inputs[slot][i] for i in given] + [v, S_in],
                                    (do, dS_out.to(S_T.dtype)), allow_unused=True)
        if grads[-2] is not None:
            self.dv[slot][..., c0:c1] = grads[-2]
        sums = self.sums[slot]
        for i, d in zip(given, grads):
            if d is not None:
                sums[i] = d if sums[i] is None else sums[i] + d
        if grads[-1] is not None:
            dS_in.copy_(grads[-1])
        else:
            dS_in.zero_()

    def grads(self):
        out = []
        for inputs, sums, dv in zip(self.inputs, self.sums, self.dv):
            dq, dk, dbeta, dg = (None if x is None else d if d is not None else torch.zeros_like(x)
                                 for x, d in zip(inputs, sums))
            out.append((dq, dk, dv, dbeta, dg))
        return out


def state_dtype(k: torch.Tensor) -> torch.dtype:
    """The carries' dtype: float64 for float64 inputs, float32 otherwise (every backend's state)."""
    return torch.float64 if k.dtype == torch.float64 else torch.float32


class StateRelay(torch.autograd.Function):
    """(q, k, v, beta, g, initial_state) -> (o, final state on every rank or None) by the relay's chain
    (module docstring); ``stages`` runs a block's local pass."""

    @staticmethod
    def forward(ctx, sp, stages, output_final_state, q, k, v, beta, g, initial):
        B, T, H, K = k.shape
        V = v.shape[-1]
        dt = state_dtype(k)
        # the chain's carries are V-major `[V, B, H, K]` (a block of columns is one contiguous buffer); ``like``
        # gives the chain their shape and dtype
        like = torch.empty(sp.n_local, V, B, H, K, dtype=dt, device=k.device)

        def combine(slot, c0, c1, carry, out):
            # one block: the chain combines block by block everywhere (blockwise_ends), so the backward meets
            # the same blocks
            stages.forward_block(slot, c0, c1, carry.movedim(0, -1), out.movedim(0, -1))
        init = None if initial is None else initial.to(dt).movedim(-1, 0)
        # blockwise ends: where a segment passes nothing on, each block's pass starts as its carry arrives
        _, last = chain_scan(like, sp.n_blocks, combine, sp.group, sp.layout, init, False, KIND,
                             blockwise_ends=True)
        final = None
        if output_final_state:
            last = None if last is None else last.movedim(0, -1).contiguous()
            final = broadcast_from(last, sp.last_owner, k.new_empty((B, H, K, V), dtype=dt), sp)
        ctx.sp, ctx.stages, ctx.output_final_state = sp, stages, output_final_state
        ctx.like = like
        ctx.dtypes = tuple(x.dtype if x is not None else None for x in (q, k, v, beta, g))
        ctx.initial_dtype = initial.dtype if initial is not None else None
        return join(stages.outputs(), sp.n_local).to(q.dtype), final

    @staticmethod
    def backward(ctx, dO, dfinal):
        sp, stages = ctx.sp, ctx.stages
        dOs = [segment(dO, sp.n_local, s) for s in range(sp.n_local)]
        dN = None
        if ctx.output_final_state and dfinal is not None:
            dN = all_reduce_sum(dfinal.to(ctx.like.dtype), sp).movedim(-1, 0)

        def combine(slot, c0, c1, carry, out):
            stages.backward_block(slot, c0, c1, dOs[slot], carry.movedim(0, -1), out.movedim(0, -1))
        _, first = chain_scan(ctx.like, sp.n_blocks, combine, sp.group, sp.layout, dN, True, KIND,
                              blockwise_ends=True)
        d_initial = None
        if ctx.initial_dtype is not None:
            d_initial = (first.movedim(0, -1) if sp.rank == sp.first_owner else
                         ctx.like.new_zeros(ctx.like.shape[1:]).movedim(0, -1))
            d_initial = d_initial.to(ctx.initial_dtype).contiguous()
        per_segment = stages.grads()
        ctx.stages = None
        dq, dk, dv, dbeta, dg = (None if dtype is None else join([d[i] for d in per_segment], sp.n_local).to(dtype)
                                 for i, dtype in enumerate(ctx.dtypes))
        return None, None, None, dq, dk, dv, dbeta, dg, d_initial


def make_stages(sp: DeltaSPContext, q, k, v, beta, g, keep: bool) -> RelayStages:
    """The local pass for this call: the wy kernels' stages where the Triton backend runs path="wy", else the
    backend's public forward under autograd."""
    segments = [tuple(segment(x, sp.n_local, s) for x in (q, k, v, beta, g)) for s in range(sp.n_local)]
    if sp.impl.__name__ == TRITON_BACKEND:   # importable: the context resolved the backend to it
        from longscan.kernels.delta_rule.triton import DeltaTritonOptions
        from longscan.kernels.delta_rule.triton.wy_relay import WYRelay
        options = (sp.options if sp.options is not None else DeltaTritonOptions()).resolved(k.dtype)
        if options.path == "wy":
            return WYRelay(segments, sp.scale, options, keep)
    return AutogradStages(sp, segments, keep)


def relay_delta_rule_sp(sp: DeltaSPContext, q, k, v, beta, g, initial_state, output_final_state):
    """-> (o `[B, T, H, V]`, final state `[B, H, K, V]` or None) by the state relay."""
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (q, k, v, beta, g, initial_state))
    stages = make_stages(sp, q, k, v, beta, g, keep)
    return StateRelay.apply(sp, stages, output_final_state, q, k, v, beta, g, initial_state)
