"""What the delta-rule SP methods share: the checked context, the operator's stages, and the autograd of
the affine scan.

A rank's segment maps the state entering it to the state leaving it, S_out = M S_in + S_loc (M `[K, K]`
= A_T ⋯ A_1, A_t = (I - β_t k_t k_tᵀ) D_t). The operator composes three stages:
  1. local:      (S_loc, M) of every local segment (``segment_transition``, differentiable);
  2. collective: the carries P entering the local segments and the final state, by the method's scan of
                 (M, S_loc) along the global order (:class:`AffineScan`; backward: the transposed scan in
                 reverse, dC_j = M_jᵀ dC_{j+1} + dP_j, then dS_j = dC_{j+1}, dM_j = dC_{j+1} P_jᵀ);
  3. output:     the local forward from P (differentiable).
Autograd joins them, so q, k, v, β and g get their gradients through both local stages.
Segments are stacked batch-major as in ``longscan.parallel.linear.common`` (one call serves zigzag's two).
Stages 1 and 3 take the context's Triton options (``DeltaTritonOptions``, e.g. path="wy") when given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from longscan.distributed.checks import check_delta_call
from longscan.distributed.layouts import check_layout, group_rank_size, num_segments
from longscan.kernels.delta_rule import TRITON_BACKEND, check_inputs, get_backend
from longscan.parallel.linear.common import METHODS, SegmentGroup, by_batch, by_segment, merge, split

# how ZeCO applies a rank's segment to the carry: "matrix" forms its K×K transition M and scans (M, S_loc);
# "relay" runs the segment's own state pass from the carry, a block of V columns at a time (``relay``)
TRANSITIONS = ("matrix", "relay")

if TYPE_CHECKING:   # importing it needs triton, which only the Triton backend requires
    from longscan.kernels.delta_rule.triton import DeltaTritonOptions


@dataclass(frozen=True)
class DeltaSPContext(SegmentGroup):
    """The group, the layout and the local compute of one call (options: the Triton backend's
    ``DeltaTritonOptions`` for both local stages, or None: the backend's defaults)."""
    scale: float
    impl: object
    n_blocks: int
    options: DeltaTritonOptions | None = None
    transition: str = "matrix"

    def local_kwargs(self) -> dict:
        """What the local stages pass to the backend besides the tensors."""
        return {} if self.options is None else {"options": self.options}


class ScanMethod(Protocol):
    """A collective for :class:`AffineScan` (one per SP method)."""

    def scan(self, sp: DeltaSPContext, M: torch.Tensor, S: torch.Tensor, initial: torch.Tensor | None,
             output_final_state: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """M `[n_local, B, H, K, K]`, S `[n_local, B, H, K, V]` -> (P `[n_local, B, H, K, V]` entering the local
        segments, the final state on every rank or None, what ``scan_back`` needs besides M, or None)."""

    def scan_back(self, sp: DeltaSPContext, M: torch.Tensor, dP: torch.Tensor, dN: torch.Tensor | None,
                  kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dP `[n_local, ...]`, dN this rank's final-state gradient (None: zero) -> (R `[n_local, B, H, K, V]`
        the gradients of the states leaving the local segments, the gradient of initial_state on the rank
        holding global segment 0, None elsewhere). The final state was returned on every rank, so its
        gradient is the sum of every rank's dN."""


class AffineScan(torch.autograd.Function):
    """(M, S_loc, initial_state) -> (P, final state) through a :class:`ScanMethod`, with its backward."""

    @staticmethod
    def forward(ctx, method, sp, M, S, initial, output_final_state):
        M, S = M.contiguous(), S.contiguous()
        P, final, kept = method.scan(sp, M, S, initial, output_final_state)
        ctx.method, ctx.sp, ctx.output_final_state = method, sp, output_final_state
        ctx.has_initial = initial is not None
        ctx.initial_dtype = initial.dtype if initial is not None else None
        ctx.save_for_backward(M, P, *([kept] if kept is not None else []))
        return P, final

    @staticmethod
    def backward(ctx, dP, dfinal):
        M, P, *kept = ctx.saved_tensors
        dP = torch.zeros_like(P) if dP is None else dP.to(P.dtype).contiguous()
        dN = dfinal.to(P.dtype) if ctx.output_final_state and dfinal is not None else None
        R, d_initial = ctx.method.scan_back(ctx.sp, M, dP, dN, kept[0] if kept else None)
        dM = R @ P.transpose(-1, -2)
        d_init = None
        if ctx.has_initial:
            d_init = d_initial if d_initial is not None else torch.zeros_like(P[0])
            d_init = d_init.to(ctx.initial_dtype).contiguous()
        return None, None, dM, R, d_init, None


def make_context(q, k, v, beta, g, scale, initial_state, output_final_state, method, group, layout, backend,
                 n_blocks, options=None, transition="matrix") -> DeltaSPContext:
    """Validate everything (ValueError/TypeError naming the parameter) and build the context. The call's
    signature is compared across the group first, so every rank raises the same error or none does."""
    check_delta_call(group, q, k, v, beta, g, scale, initial_state, output_final_state, method, layout, n_blocks,
                     backend, options, transition)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if transition not in TRANSITIONS:
        raise ValueError(f"transition must be one of {TRANSITIONS}, got {transition!r}")
    if transition != "matrix" and method != "zeco":
        raise ValueError(f"transition={transition!r} is an option of method='zeco'; method={method!r} takes "
                         f"transition='matrix'")
    check_layout(layout)
    check_inputs(q, k, v, beta, g, initial_state)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive int, got {n_blocks!r}")
    n_blocks = min(n_blocks, v.shape[-1])   # a block is at least one column of V
    rank, world = group_rank_size(group)
    T = q.shape[1]
    if T == 0:
        raise ValueError("q.shape[1] (the local length) must be positive")
    if layout == "zigzag" and T % 2:
        raise ValueError(f"layout='zigzag' needs an even local length q.shape[1], got {T}")
    impl = get_backend(backend, q.device)
    check_options(options, impl, backend, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sp = DeltaSPContext(group, layout, rank, world, num_segments(world, layout) // world, scale, impl, n_blocks,
                        options, transition)
    return sp


def check_options(options, impl, backend, device) -> None:
    """options: None or a ``DeltaTritonOptions``, for a call that runs the Triton backend."""
    if options is None:
        return
    if impl.__name__ != TRITON_BACKEND:
        raise ValueError(f"options apply to the Triton backend only; backend={backend!r} runs "
                         f"{impl.__name__.rsplit('.', 1)[-1]} on {device.type}")
    from longscan.kernels.delta_rule.triton import DeltaTritonOptions   # importable: impl is the Triton backend
    if not isinstance(options, DeltaTritonOptions):
        raise TypeError(f"options must be a DeltaTritonOptions, got {type(options).__name__}")


def delta_rule_sp(method: ScanMethod, sp: DeltaSPContext, q, k, v, beta, g, initial_state, output_final_state):
    """The three stages (module docstring) -> (o `[B, T, H, V]`, final state `[B, H, K, V]` or None)."""
    n = sp.n_local
    qs, ks, vs, bs, gs = (split(x, n) for x in (q, k, v, beta, g))
    S_loc, M = sp.impl.segment_transition(ks, vs, bs, gs, **sp.local_kwargs())
    P, final = AffineScan.apply(method, sp, by_segment(M, n), by_segment(S_loc, n), initial_state,
                                output_final_state)
    o, _ = sp.impl.forward(qs, ks, vs, bs, gs, sp.scale, by_batch(P), False, **sp.local_kwargs())
    return merge(o, n), final
