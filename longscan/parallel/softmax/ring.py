"""Ring attention: K/V blocks travel the ring while each rank attends to the block it holds.

Step s, rank r holds the K/V of rank (r - s) mod W. The send of that block to rank r+1 (and the receive
of the next one) is launched before the local block's attention and waited for after it, so the
transfer overlaps the compute. Partial outputs are merged with their logsumexp in float32 (float64 for
float64 inputs) and cast once at the end (docs/design.md, "Pitfalls": per-block bf16 merges drift with W).

Causal masking is decided per piece (``common.block_plan``). With zigzag (rank r holds pieces r and
2W-1-r) every step costs the same: step 0 is one causal call on the local sequence; a block from rank
j < r is seen fully by both local pieces but only its first half is visible (`T × T/2`); from j > r
only the second local piece sees it, all of it (`T/2 × T`); the fully masked pairs are skipped.
With contiguous, blocks from later ranks are skipped entirely (correct, but unbalanced).
With packed documents a step computes only the piece pairs that share a document, and of those only the
shared documents' rows (none: no compute that step, but the block still travels on).

Backward recomputes the ring: K/V travel again, and each block's dK/dV accumulator travels with it,
gathering every rank's contribution, and arrives home after W hops.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from longscan.distributed.layouts import group_rank_size, segment_ids
from longscan.distributed.ring import RingComm
from longscan.parallel.softmax.common import (Call, backward_blocks, block_plan, forward_blocks, new_accumulators,
                                              sp_documents, widened, zeros_acc)
from longscan.parallel.softmax.function import SoftmaxSPFunction, SoftmaxSPOptions


class RingStep(NamedTuple):
    """What rank r computes at one ring step: the visiting block's owner ``src``, the kernel calls (``plan``), the
    document ids of the queries and of the visiting keys (only where a call of the plan needs them: with short
    documents most steps of a large ring see nothing, or only one document shared with a neighbour, and ids would
    cost host work and copies for no mask), and whether a later step merges into its rows (the kernels then write
    its blocks in the compute dtype rather than a pass widening them after)."""
    src: int
    plan: list[Call]
    q_docs: Optional[torch.Tensor] = None
    k_docs: Optional[torch.Tensor] = None
    merges_follow: bool = False


def ring_steps(rank, world, layout, causal, docs, t_local) -> list[RingStep]:
    """Rank ``rank``'s W steps, each step's plan made once for the forward or the backward. ``docs``:
    :func:`sp_documents` of the call, or None; ``t_local``: the rank's tokens."""
    q_segs = segment_ids(rank, world, layout)
    srcs = [(rank - s) % world for s in range(world)]
    plans = [block_plan(q_segs, segment_ids(src, world, layout), causal, t_local // len(q_segs),
                        docs.blocks if docs is not None else None) for src in srcs]
    steps = []
    for s, (src, plan) in enumerate(zip(srcs, plans)):
        ids = any(call.docs for call in plan)
        steps.append(RingStep(src, plan, docs.of_rank(rank, t_local) if ids else None,
                              docs.of_rank(src, t_local) if ids else None, any(plans[s + 1:])))
    return steps


def forward_step(out, lse, q, k, v, step: RingStep, scale, backend):
    """One ring step's compute: the local queries against the K/V block of rank ``step.src``, merged into
    (out, lse) -> (out, lse)."""
    return forward_blocks(out, lse, q, k, v, step.plan, scale, backend, q_docs=step.q_docs, k_docs=step.k_docs,
                          merges_follow=step.merges_follow)


def backward_step(dq, do, q, k, v, o, lse, step: RingStep, scale, backend, kv_widened: bool):
    """One ring step's backward compute -> (dq, dk, dv of the block of rank ``step.src``: None where nothing was
    visible). ``kv_widened``: dk, dv in the compute dtype (a ring of more than one rank: they travel and are
    summed in it)."""
    return backward_blocks(dq, None, None, do, q, k, v, o, lse, step.plan, scale, backend, step.q_docs,
                           step.k_docs, adds_follow=step.merges_follow, kv_widened=kv_widened)


def ring_forward(q, k, v, scale, causal, group, layout, backend, cu_seqlens=None):
    """-> (out `[B, T, Hq, D]`, lse `[B, Hq, T]`) in the compute dtype (out in q's dtype when one kernel call
    made it)."""
    rank, world = group_rank_size(group)
    docs = sp_documents(cu_seqlens, q.shape[1], world, layout, causal, q.device)
    out = lse = None
    comm = RingComm(group) if world > 1 else None
    kv = [k, v]
    for step, work in enumerate(ring_steps(rank, world, layout, causal, docs, q.shape[1])):
        if step + 1 < world:
            nxt = comm.send_recv(kv)
            comm.commit()
        out, lse = forward_step(out, lse, q, kv[0], kv[1], work, scale, backend)
        if step + 1 < world:
            comm.wait()
            kv = nxt
    return (out, lse) if out is not None else new_accumulators(q, v.shape[-1])


def ring_backward(do, q, k, v, o, lse, scale, causal, group, layout, backend, cu_seqlens=None):
    """-> (dq, dk, dv) in the compute dtype or, where one kernel call made one, q's (dk/dv with the Hkv heads
    of k/v)."""
    rank, world = group_rank_size(group)
    docs = sp_documents(cu_seqlens, q.shape[1], world, layout, causal, q.device)
    dq = None
    kv_comm = RingComm(group) if world > 1 else None
    d_comm = RingComm(group) if world > 1 else None
    kv, d_in = [k, v], None
    for step, work in enumerate(ring_steps(rank, world, layout, causal, docs, q.shape[1])):
        if step + 1 < world:
            kv_nxt = kv_comm.send_recv(kv)
            kv_comm.commit()
        dq, dk_b, dv_b = backward_step(dq, do, q, kv[0], kv[1], o, lse, work, scale, backend, world > 1)
        if world > 1:
            # the accumulators travel in the compute dtype; one that arrives at a step that computed nothing
            # (packed documents) travels on as it came, without zeros to add it to
            if step == 0 or dk_b is not None:
                dk_b, dv_b = widened(dk_b, k), widened(dv_b, v)
            if step > 0:
                # The accumulator of block `src` arrives from rank r-1 (sent at the end of its step s-1);
                # its transfer overlapped the compute above.
                d_comm.wait()
                dk_b, dv_b = (d_in if dk_b is None else (dk_b.add_(d_in[0]), dv_b.add_(d_in[1])))
            d_in = d_comm.send_recv([dk_b, dv_b])   # after step W-1 this lands on the block's owner
            d_comm.commit()
        if step + 1 < world:
            kv_comm.wait()
            kv = kv_nxt
    dq = dq if dq is not None else zeros_acc(q)
    if world == 1:
        return dq, *(d if d is not None else zeros_acc(x) for d, x in ((dk_b, k), (dv_b, v)))
    d_comm.wait()
    return dq, d_in[0], d_in[1]


class Ring:
    """method="ring": the hooks of :class:`~longscan.parallel.softmax.function.SoftmaxSPFunction`."""
    name = "ring"

    def check(self, q, k, world, opts: SoftmaxSPOptions) -> None:
        pass                                          # any heads, any group size

    def forward(self, q, k, v, opts: SoftmaxSPOptions):
        return ring_forward(q, k, v, opts.scale, opts.causal, opts.group, opts.layout, opts.backend,
                            opts.cu_seqlens)

    def backward(self, do, q, k, v, o, lse, opts: SoftmaxSPOptions):
        return ring_backward(do, q, k, v, o, lse, opts.scale, opts.causal, opts.group, opts.layout, opts.backend,
                             opts.cu_seqlens)

    def attend(self, q, k, v, opts: SoftmaxSPOptions) -> torch.Tensor:
        return SoftmaxSPFunction.apply(q, k, v, self, opts)
