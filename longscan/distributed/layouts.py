"""Sequence layouts: which global tokens each rank of an SP group holds.

The single source of truth for these maps (docs/design.md, "Sequence layouts"). A global sequence of W·T
tokens over W ranks:
- ``contiguous``: rank r holds tokens ``[r·T, (r+1)·T)``, one segment.
- ``zigzag``: the sequence is cut into 2W pieces of T/2; rank r holds pieces r and 2W-1-r, in that
  order, as two segments. This balances causal softmax work.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def group_rank_size(group=None) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def segment_ids(rank: int, world_size: int, layout: str) -> list[int]:
    """Global indices of the segments a rank holds, in local order.

    Contiguous: W segments, rank r holds [r]. Zigzag: 2W pieces, rank r holds [r, 2W-1-r].
    """
    check_layout(layout)
    if layout == "contiguous":
        return [rank]
    return [rank, 2 * world_size - 1 - rank]


def num_segments(world_size: int, layout: str) -> int:
    check_layout(layout)
    return world_size if layout == "contiguous" else 2 * world_size


def segment_owner(seg: int, world_size: int, layout: str) -> tuple[int, int]:
    """(rank, local slot) holding global segment ``seg``."""
    check_layout(layout)
    if layout == "contiguous":
        return seg, 0
    return (seg, 0) if seg < world_size else (2 * world_size - 1 - seg, 1)


def positions(local_len: int, group=None, layout: str = "contiguous", device=None) -> torch.Tensor:
    """Global token positions `[local_len]` (int64) of this rank's tokens, e.g. for RoPE."""
    rank, world = group_rank_size(group)
    if layout == "zigzag" and local_len % 2:
        raise ValueError(f"zigzag layout needs an even local length, got {local_len}")
    segs = segment_ids(rank, world, layout)
    seg_len = local_len // len(segs)
    return torch.cat([torch.arange(s * seg_len, (s + 1) * seg_len, device=device) for s in segs])


def shard(x: torch.Tensor, dim: int = 1, group=None, layout: str = "contiguous") -> torch.Tensor:
    """This rank's part of the global tensor ``x`` along ``dim`` (every rank passes the same ``x``)."""
    rank, world = group_rank_size(group)
    check_layout(layout)
    n = num_segments(world, layout)
    if x.shape[dim] % n:
        raise ValueError(f"x.shape[{dim}] = {x.shape[dim]} must divide into {n} segments for "
                         f"layout={layout!r} over {world} ranks")
    pieces = x.chunk(n, dim=dim)
    return torch.cat([pieces[s] for s in segment_ids(rank, world, layout)], dim=dim).contiguous()


def unshard(x: torch.Tensor, dim: int = 1, group=None, layout: str = "contiguous") -> torch.Tensor:
    """Inverse of :func:`shard`: gathers every rank's local part and returns the global tensor.

    Communication only (no autograd); every rank gets the whole tensor.
    """
    rank, world = group_rank_size(group)
    check_layout(layout)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    n = num_segments(world, layout)
    per_rank = n // world
    if x.shape[dim] % per_rank:
        raise ValueError(f"x.shape[{dim}] = {x.shape[dim]} must be even for layout='zigzag'")
    pieces = [None] * n
    for r, part in enumerate(parts):
        for slot, chunk in enumerate(part.chunk(per_rank, dim=dim)):
            pieces[segment_ids(r, world, layout)[slot]] = chunk
    return torch.cat(pieces, dim=dim)
