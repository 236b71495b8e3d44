"""Packed documents (``cu_seqlens``) through a linear SP method, with per-document initial and final states.

Documents enter every method as resets: a log decay of -inf at each document's first token (but the global
first), which the scans carry exactly, so a document spanning ranks flows through the scan as any sequence
does. Per-document states `[N, H, K, V]` are added by linearity on this rank's runs (the spans of one document
inside one local segment; ``longscan.kernels.linear_attention.documents``):
- a document's initial state enters on the rank where the document starts: it adds to those tokens' outputs
  and, where the document runs on past the segment, to the state the segment leaves, which the method's scan
  then carries to the later ranks (``extra``);
- a document's final state comes from the rank where it ends: from the state entering that segment (the
  method's P, whose gradient joins the reverse scan) or its initial state, and the run's own tokens; then a
  sum over the group replicates the `[N, H, K, V]` states on every rank.
initial_state is replicated: each rank's gradient of it is its own runs' share, so the sum over ranks is the
single-device gradient (as for the unpacked initial_state). Every rank's copy of the final states is an
output: their gradients are summed over the group.
"""
from __future__ import annotations

import torch

from longscan.kernels.linear_attention import LinearKernelOptions
from longscan.kernels.linear_attention.documents import (base_log_decay, check_finite_decay, document_finals,
                                                         document_resets, document_runs, leaving_states, run_decays,
                                                         start_outputs, with_resets_gate)
from longscan.parallel.linear.common import (LinearSPMethod, SPContext, SPLinearAttentionFunction, all_reduce_sum,
                                             make_context)


class _SumOverGroup(torch.autograd.Function):
    """The sum of a tensor over the group, on every rank; the gradient of every rank's copy summed back (the
    global loss is the sum of the ranks' losses)."""

    @staticmethod
    def forward(ctx, x, sp: SPContext):
        ctx.sp = sp
        return all_reduce_sum(x, sp)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.sp), None


def run_documents(method: LinearSPMethod, q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                  output_final_state=False, group=None, layout="contiguous", backend="auto", n_blocks=4,
                  overlap=False, options: LinearKernelOptions | None = None, cu_seqlens=None):
    """``method`` over packed documents: -> (o `[1, T, H, V]`, final states `[N, H, K, V]` on every rank or None).
    initial_state: None or `[N, H, K, V]`, the same on every rank."""
    sp = make_context(q, k, v, g, g_gamma, scale, initial_state, group, layout, backend,
                      n_blocks if method.uses_blocks else 1, overlap, options, cu_seqlens, output_final_state)
    states = initial_state is not None or output_final_state
    if states:
        check_finite_decay(g)
    T = q.shape[1]
    resets = document_resets(cu_seqlens, T, sp.world, sp.rank, sp.layout, q.device)
    base = base_log_decay(q, g, g_gamma)
    extra = runs = decays = None
    if states:
        runs = document_runs(cu_seqlens, T, sp.world, sp.rank, sp.layout, q.device, v.shape[-1])
        decays = run_decays(base, runs, q.dtype)
    if initial_state is not None:
        extra = leaving_states(base, initial_state, runs, decays)
    o, _, P = SPLinearAttentionFunction.apply(method, sp, q, k, v, with_resets_gate(base, resets), None, None, False,
                                              extra)
    if initial_state is not None:
        o = o + start_outputs(q, base, initial_state, runs, decays, sp.scale).to(o.dtype)
    if not output_final_state:
        return o, None
    finals = document_finals(k, v, base, initial_state, P, runs, decays)
    return o, (_SumOverGroup.apply(finals, sp) if sp.world > 1 else finals)


__all__ = ["run_documents"]
