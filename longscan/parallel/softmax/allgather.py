"""All-gather K/V attention (the softmax half of LASP-2H).

Every rank all-gathers K and V of the whole sequence, attends with its local queries against them, and
in backward reduce-scatters dK/dV back to the ranks owning those tokens. With ``chunk_heads`` the kv
heads are processed in groups of that size (their query heads with them, for GQA), so only one group's
full-sequence K/V is alive at a time.

The gathered blocks arrive rank by rank; they are re-ordered into global sequence order (one copy per
head group) so that the causal mask at global positions becomes, for each local query piece a, one
"full" call on the keys of pieces < a and one "causal" call on piece a.

Backward gathers K/V again rather than keeping them from forward: memory over communication.
With packed documents only piece pairs that share a document are computed; the gather is unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from longscan.distributed.layouts import group_rank_size, num_segments, segment_ids, segment_owner
from longscan.distributed.stats import count, nbytes, waiting
from longscan.parallel.softmax.common import (backward_blocks, block_plan, forward_blocks, new_accumulators,
                                              sp_documents, zeros_acc)
from longscan.parallel.softmax.function import SoftmaxSPFunction, SoftmaxSPOptions


# torch 2.13 renamed the single-tensor collectives *_single; the old names warn on every call.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _head_chunks(hkv: int, chunk_heads):
    step = hkv if chunk_heads is None else chunk_heads
    return [(h, min(h + step, hkv)) for h in range(0, hkv, step)]


def _to_global(parts: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    """Rank-major `[W, B, T, H, D]` -> `[B, W·T, H, D]` in global sequence order."""
    n = num_segments(world, layout)
    seg_len = parts.shape[2] * world // n
    pieces = []
    for s in range(n):
        owner, slot = segment_owner(s, world, layout)
        pieces.append(parts[owner][:, slot * seg_len:(slot + 1) * seg_len])
    return torch.cat(pieces, dim=1)


def _to_rank_major(x: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`_to_global`: `[B, W·T, H, D]` -> contiguous `[W, B, T, H, D]`."""
    n = num_segments(world, layout)
    pieces = x.chunk(n, dim=1)
    return torch.stack([torch.cat([pieces[s] for s in segment_ids(r, world, layout)], dim=1)
                        for r in range(world)])


def _all_gather(x, group, world, layout):
    """Local `[B, T, H, D]` -> global-order `[B, W·T, H, D]`."""
    if world == 1:
        return x
    x = x.contiguous()
    # Rank-major, concatenated along dim 0 as the collective expects; viewed as [W, B, ...] below.
    buf = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    with waiting("kv_allgather"):
        _all_gather_single(buf, x, group=group)
    count(sent=nbytes(x) * (world - 1), recv=nbytes(x) * (world - 1), kind="kv_allgather")
    buf = buf.view((world,) + tuple(x.shape))
    return _to_global(buf, world, layout)


def _reduce_scatter(x, group, world, layout):
    """Global-order partial sums `[B, W·T, H, D]` -> this rank's summed `[B, T, H, D]`."""
    if world == 1:
        return x
    parts = _to_rank_major(x, world, layout)
    out = parts.new_empty(parts.shape[1:])
    with waiting("dkv_reduce_scatter"):
        _reduce_scatter_single(out, parts.flatten(0, 1), group=group)
    count(sent=nbytes(out) * (world - 1), recv=nbytes(out) * (world - 1), kind="dkv_reduce_scatter")
    return out


def _plan(group, layout, causal, q, cu_seqlens):
    """-> (plan, W, local q ids, global k ids); the ids are None where no call needs them."""
    rank, world = group_rank_size(group)
    q_segs = segment_ids(rank, world, layout)
    seg_len = q.shape[1] // len(q_segs)
    docs = sp_documents(cu_seqlens, q.shape[1], world, layout, causal, q.device)
    plan = block_plan(q_segs, list(range(num_segments(world, layout))), causal, seg_len,
                      None if docs is None else docs.blocks)
    if not any(call.docs for call in plan):
        return plan, world, None, None
    return plan, world, docs.of_rank(rank, q.shape[1]), docs.ids


def allgather_forward(q, k, v, scale, causal, group, layout, backend, chunk_heads, cu_seqlens=None):
    """-> (out `[B, T, Hq, D]`, lse `[B, Hq, T]`) in the compute dtype."""
    plan, world, q_docs, k_docs = _plan(group, layout, causal, q, cu_seqlens)
    g = q.shape[2] // k.shape[2]
    out, lse = new_accumulators(q, v.shape[-1])
    for h0, h1 in _head_chunks(k.shape[2], chunk_heads):
        kg = _all_gather(k[:, :, h0:h1], group, world, layout)
        vg = _all_gather(v[:, :, h0:h1], group, world, layout)
        qh = slice(h0 * g, h1 * g)               # the query heads reading kv heads [h0, h1)
        # out/lse head slices are views: forward_blocks merges into them in place.
        forward_blocks(out[:, :, qh], lse[:, qh], q[:, :, qh], kg, vg, plan, scale, backend,
                       q_docs=q_docs, k_docs=k_docs)
        del kg, vg
    return out, lse


def allgather_backward(do, q, k, v, o, lse, scale, causal, group, layout, backend, chunk_heads, cu_seqlens=None):
    """-> (dq, dk, dv) in the compute dtype."""
    plan, world, q_docs, k_docs = _plan(group, layout, causal, q, cu_seqlens)
    g = q.shape[2] // k.shape[2]
    dq, dk, dv = zeros_acc(q), zeros_acc(k), zeros_acc(v)
    for h0, h1 in _head_chunks(k.shape[2], chunk_heads):
        kg = _all_gather(k[:, :, h0:h1], group, world, layout)
        vg = _all_gather(v[:, :, h0:h1], group, world, layout)
        qh = slice(h0 * g, h1 * g)
        dkg, dvg = zeros_acc(kg), zeros_acc(vg)
        backward_blocks(dq[:, :, qh], dkg, dvg, do[:, :, qh], q[:, :, qh], kg, vg, o[:, :, qh], lse[:, qh],
                        plan, scale, backend, q_docs, k_docs)
        dk[:, :, h0:h1] = _reduce_scatter(dkg, group, world, layout)
        dv[:, :, h0:h1] = _reduce_scatter(dvg, group, world, layout)
        del kg, vg, dkg, dvg
    return dq, dk, dv


class AllGather:
    """method="allgather": the hooks of :class:`~longscan.parallel.softmax.function.SoftmaxSPFunction`."""
    name = "allgather"

    def check(self, q, k, world, opts: SoftmaxSPOptions) -> None:
        pass                                          # any heads, any group size; chunk_heads checks itself

    def forward(self, q, k, v, opts: SoftmaxSPOptions):
        return allgather_forward(q, k, v, opts.scale, opts.causal, opts.group, opts.layout, opts.backend,
                                 opts.chunk_heads, opts.cu_seqlens)

    def backward(self, do, q, k, v, o, lse, opts: SoftmaxSPOptions):
        return allgather_backward(do, q, k, v, o, lse, opts.scale, opts.causal, opts.group, opts.layout,
                                  opts.backend, opts.chunk_heads, opts.cu_seqlens)

    def attend(self, q, k, v, opts: SoftmaxSPOptions) -> torch.Tensor:
        return SoftmaxSPFunction.apply(q, k, v, self, opts)
