"""The pipelined chain both All-Scans run (``all_scan``: diagonal decays; ``affine_scan``: the delta rule).

One carry per global segment travels along the segment order (``reverse``: last to first), rank to rank.
The carry is cut into blocks along one axis that the combine treats row by row; each block is sent to the
next segment's rank as soon as it is combined, and every block's receive is posted before the first is
waited for, so the hops of consecutive blocks overlap: latency ≈ (hops + blocks - 1) block transfers.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from longscan.distributed.layouts import group_rank_size, num_segments, segment_owner
from longscan.distributed.stats import count, nbytes, waiting

Combine = Callable[[int, int, int, torch.Tensor, torch.Tensor], None]
"""combine(slot, x0, x1, carry, out): local segment ``slot``'s outgoing carry rows x0:x1 into ``out`` from its
incoming carry rows ``carry`` (both `[x1 - x0, ...]`)."""


def blocks(n: int, n_blocks: int) -> list[tuple[int, int]]:
    """n rows (or columns) cut into n_blocks contiguous (start, end) blocks, the first n % n_blocks one longer."""
    size, extra = divmod(n, n_blocks)
    ends = [(b + 1) * size + min(b + 1, extra) for b in range(n_blocks)]
    return list(zip([0] + ends[:-1], ends))


def global_rank(group, r: int) -> int:
    """The global rank of group rank r (what point-to-point calls take)."""
    return r if group is None else dist.get_global_rank(group, r)


def chain_scan(terms: torch.Tensor, n_blocks: int, combine: Combine, group, layout: str,
               initial: torch.Tensor | None, reverse: bool, kind: str = "other", blockwise_ends: bool = False):
    """The chain over an SP group of more than one rank.

    terms `[n_local, X, ...]`: this rank's segments in local order, X the blocked axis first (so a block is one
    contiguous buffer: received in place, combined, sent without a copy); ``initial`` `[X, ...]` enters the
    scan's first segment, zeros when None. ``kind`` labels the bytes and waits for the profiler. A segment with
    nothing to pass on (the scan's last; zigzag's turn, where the next segment is local) is combined once every
    block is in, as one combine; with ``blockwise_ends`` block by block as each arrives instead (for a combine
    whose work is per block anyway: the block's work then overlaps the later blocks' hops).

    -> (carries `[n_local, X, ...]` entering each local segment, the carry leaving the scan's last segment on
    the rank that owns it and None elsewhere).
    """
    rank, world = group_rank_size(group)
    n = num_segments(world, layout)
    order = list(range(n))[::-1] if reverse else list(range(n))
    X = terms.shape[1]
    cuts = blocks(X, n_blocks)
    carries = torch.empty_like(terms)
    sends, last, local_out = [], None, None
    for pos, seg in enumerate(order):
        owner, slot = segment_owner(seg, world, layout)
        if owner != rank:
            continue
        src = segment_owner(order[pos - 1], world, layout)[0] if pos > 0 else None
        dst = segment_owner(order[pos + 1], world, layout)[0] if pos + 1 < n else None
        recvs = []
        if src is not None and src != rank:
            for b, (x0, x1) in enumerate(cuts):
                buf = carries[slot, x0:x1]
                recvs.append(dist.irecv(buf, global_rank(group, src), group=group, tag=order[pos - 1] * n_blocks + b))
                count(recv=nbytes(buf), kind=kind)
        elif src == rank:
            carries[slot] = local_out
        elif initial is None:
            carries[slot] = 0
        else:
            carries[slot] = initial
        out = torch.empty_like(terms[slot])
        pass_on = dst is not None and dst != rank
        if pass_on or blockwise_ends:
            for b, (x0, x1) in enumerate(cuts):
                if recvs:
                    with waiting(kind):
                        recvs[b].wait()
                combine(slot, x0, x1, carries[slot, x0:x1], out[x0:x1])
                if pass_on:
                    sends.append(dist.isend(out[x0:x1], global_rank(group, dst), group=group,
                                            tag=seg * n_blocks + b))
                    count(sent=nbytes(out[x0:x1]), kind=kind)
        else:   # nothing to pass on: one combine once every block is in
            with waiting(kind):
                for work in recvs:
                    work.wait()
            combine(slot, 0, X, carries[slot], out)
        if dst is None:
            last = out
        local_out = out
    with waiting(kind):
        for work in sends:
            work.wait()
    return carries, last
