"""The delta rule in Triton, composed of its stages: the chunks' own quantities (intra_fwd), the recurrence
across chunks (inter), and in reverse their backward (inter, then intra_bwd), as one autograd.Function.

What the backward reads is kept from the forward: the inputs, P = (I + A)⁻¹ a chunk, the chunks' W, U_0, QK,
Q̃, K̄, l and the state entering each chunk (all float32); with options.recompute only the inputs are kept,
and the backward runs the intra stage and the recurrence's state pass again. options.intra="torch" takes the
chunks' quantities from batched torch (``torch_chunk._intra``, recomputed in the backward) instead: the
earlier path.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from longscan.kernels import trace
from longscan.kernels.delta_rule import KERNEL_PATHS
from longscan.kernels.delta_rule.torch_chunk import _chunks, _intra
from longscan.kernels.delta_rule.triton.inter import Chunks, InterChunk, inter_backward_states, inter_forward
from longscan.kernels.delta_rule.triton.intra_bwd import intra_backward
from longscan.kernels.delta_rule.triton.intra_fwd import intra_forward
from longscan.kernels.delta_rule.triton.options import DeltaTritonOptions
from longscan.kernels.delta_rule.triton.wy import wy_scan


class DeltaRuleChunk(torch.autograd.Function):
    """(q or None, k, v, beta, g None, `[B, T, H]` or `[B, T, H, K]`, h0 or None) ->
    (o `[B, H, N, C, V]` float32 or None, S_T `[B, H, K, V]` float32)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, options):
        chunks, P, O, HT, SN = _stages(q, k, v, beta, g, h0, scale, options)
        if options.recompute:
            ctx.save_for_backward(q, k, v, beta, g, h0)
        else:
            ctx.save_for_backward(q, k, v, beta, g, P, SN, *chunks)
        ctx.scale, ctx.options = scale, options
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        return O, HT

    @staticmethod
    def backward(ctx, dO, dHT):
        o = ctx.options
        if o.recompute:
            q, k, v, beta, g, h0 = ctx.saved_tensors
            chunks, P, _, _, SN = _stages(q, k, v, beta, g, h0, ctx.scale, o, outputs=False)
        else:
            q, k, v, beta, g, P, SN, *chunks = ctx.saved_tensors
            chunks = Chunks(*chunks)
        kw = dict(block_v=o.block_v, num_warps=o.num_warps, precision=o.input_precision)
        if q is not None and dO is None:    # only the final state reached the loss (materialize_grads off)
            dO = torch.zeros_like(chunks.U0)
        grads = inter_backward_states(chunks, SN, dO, dHT, ctx.scale, num_stages=o.inter_num_stages,
                                      block_k=o.inter_block_k, **kw)
        dq, dk, dv, dbeta, dg = intra_backward(grads, chunks, P, q=q, k=k, v=v, beta=beta, g=g, SN=SN, dO=dO,
                                               scale=ctx.scale, block_k=o.block_k,
                                               num_stages=o.intra_num_stages, **kw)
        cast = lambda d, x: d.to(x.dtype) if d is not None else None  # noqa: E731
        dh0 = grads.dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None
        return cast(dq, q), cast(dk, k), cast(dv, v), cast(dbeta, beta), cast(dg, g), dh0, None, None


def _stages(q, k, v, beta, g, h0, scale, options, outputs=True):
    """The forward's stages -> (Chunks, P, o or None, S_T, S_n). outputs=False: the states alone (the
    backward's recomputation: the outputs' pass over the chunks is skipped)."""
    kw = dict(block_v=options.block_v, num_warps=options.num_warps, precision=options.input_precision)
    chunks, P = intra_forward(q=q, k=k, v=v, beta=beta, g=g, chunk=options.chunk, block_k=options.block_k,
                              num_stages=options.intra_num_stages, inverse=options.inverse, **kw)
    O, HT, SN = inter_forward(chunks if outputs else chunks._replace(QK=None, QT=None), h0, scale,
                              num_stages=options.inter_num_stages, block_k=options.inter_block_k, **kw)
    return chunks, P, O, HT, SN


def _torch_intra(q, k, v, beta, g, h0, scale, options):
    """The earlier path: the chunks' quantities in batched torch (checkpointed), the recurrence in Triton."""
    C = min(options.chunk, k.shape[1])
    args = (_chunks(q.float(), C) if q is not None else None, _chunks(k.float(), C), _chunks(v.float(), C),
            _chunks(beta.float().unsqueeze(-1), C),
            _chunks((g.unsqueeze(-1) if g.dim() == 3 else g).float(), C) if g is not None else None)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args):
        W, U0, qk, q_tilde, k_bar, last = checkpoint(_intra, *args, use_reentrant=False)
    else:
        W, U0, qk, q_tilde, k_bar, last = _intra(*args)
    return InterChunk.apply(W, U0, qk, q_tilde, k_bar, last, h0, scale, options.block_v, options.num_warps,
                             options.inter_num_stages, options.input_precision, options.inter_block_k)


def scan(*, q, k, v, beta, g, h0, scale: float, options: DeltaTritonOptions):
    """-> (o `[B, T, H, V]` float32 (k's dtype on path="wy") or None when q is None, final state `[B, H, K, V]`
    float32). options.path is "float32" or "wy" (``DeltaTritonOptions.resolved`` turns "auto" into one)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    if k.dtype == torch.float64:
        raise TypeError("backend='triton' computes in float32; for float64 inputs use backend='torch'")
    if options.path not in KERNEL_PATHS:
        raise ValueError(f"scan runs one kernel set {KERNEL_PATHS}, got path={options.path!r}: pass "
                         f"options.resolved(k.dtype)")
    trace.emit("delta_scan", path=options.path, outputs=q is not None)   # the kernel set that runs
    if options.path == "wy":
        o, S = wy_scan(q=q, k=k, v=v, beta=beta, g=g, h0=h0, scale=scale, options=options)
        return o, S
    if options.intra == "torch":
        o, S = _torch_intra(q, k, v, beta, g, h0, scale, options)
    else:
        o, S = DeltaRuleChunk.apply(q, k, v, beta, g, h0, scale, options)
    if o is not None:
        N, C = o.shape[2], o.shape[3]
        o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o, S
