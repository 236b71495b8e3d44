"""The short causal convolution of the delta-rule layers (depthwise, kernel 4, SiLU), over SP shards.

Token t of a piece needs the (kernel - 1) tokens before it in the *global* order; for a piece's first
tokens those live at the end of the piece before it, on another rank (contiguous: rank r - 1; zigzag:
piece p's predecessor p - 1 is on rank p - 1 for the first piece of a rank, on rank r + 1 for the second,
and on this rank for rank W - 1). :class:`HaloExchange` sends each piece's last (kernel - 1) tokens to the
owner of the next piece by point-to-point messages (no gather of the sequence); its backward sends the
halo's gradient back to where the tokens came from.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longscan.distributed.layouts import group_rank_size, num_segments, segment_ids, segment_owner
from longscan.distributed.stats import count, nbytes, waiting


HALO_KIND = "conv_halo"   # the bytes' and waits' label for the profiler


def _global(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _exchange(send: torch.Tensor, group, layout: str, forward: bool) -> torch.Tensor:
    """Per local piece p (global id): forward, ``send[slot]`` goes to the owner of p + 1 and the result's
    slot holds what came from the owner of p - 1 (zeros for piece 0); backward, the reverse direction
    (zeros for the last piece). send `[n_local, ...]` -> `[n_local, ...]`."""
    rank, world = group_rank_size(group)
    n = num_segments(world, layout)
    mine = segment_ids(rank, world, layout)
    step = 1 if forward else -1
    send = send.contiguous()   # P2P needs dense buffers (a gradient may come strided)
    recv = torch.zeros_like(send)
    works = []
    for slot, p in enumerate(mine):
        src = p - step
        if 0 <= src < n:
            owner, src_slot = segment_owner(src, world, layout)
            if owner == rank:
                recv[slot] = send[src_slot]
            else:   # tagged by the receiving piece: a rank may get two messages from one peer
                works.append(dist.irecv(recv[slot], _global(group, owner), group=group, tag=p))
                count(recv=nbytes(recv[slot]), kind=HALO_KIND)
        dst = p + step
        if 0 <= dst < n:
            owner, _ = segment_owner(dst, world, layout)
            if owner != rank:
                works.append(dist.isend(send[slot], _global(group, owner), group=group, tag=dst))
                count(sent=nbytes(send[slot]), kind=HALO_KIND)
    with waiting(HALO_KIND):
        for w in works:
            w.wait()
    return recv


class HaloExchange(torch.autograd.Function):
    """tails `[n_local, B, w, C]` (each local piece's last w tokens) -> halos `[n_local, B, w, C]` (the w
    tokens before each local piece in the global order; zeros before the sequence)."""

    @staticmethod
    def forward(ctx, tails, group, layout):
        ctx.group, ctx.layout = group, layout
        return _exchange(tails, group, layout, forward=True)

    @staticmethod
    def backward(ctx, dhalos):
        return _exchange(dhalos, ctx.group, ctx.layout, forward=False), None, None


CONV_KERNEL = 4   # the delta-rule layers' short convolution: each token sees itself and the 3 before it


class ShortConvolution(nn.Module):
    """x `[B, T, C]` (T local to the SP rank) -> SiLU(depthwise causal conv of x) `[B, T, C]`.

    ``channels`` are this TP rank's; the weight `[channels, kernel]` is this rank's slice of the full
    `[full_channels, kernel]` weight drawn at construction (the same weights for every TP split)."""

    def __init__(self, channels: int, full_channels: int, tp_rank: int, kernel: int = 4):
        super().__init__()
        if kernel < 1:
            raise ValueError(f"kernel must be >= 1, got {kernel}")
        self.kernel = kernel
        bound = kernel ** -0.5   # nn.Conv1d's default for a depthwise filter (fan-in = kernel)
        full = torch.empty(full_channels, kernel).uniform_(-bound, bound)
        self.weight = nn.Parameter(full[tp_rank * channels:(tp_rank + 1) * channels].clone())
        self.weight.tensor_model_parallel = True   # a TP shard, like the heads it filters
        self.weight.partition_dim = 0

    def forward(self, x: torch.Tensor, group=None, layout: str = "contiguous") -> torch.Tensor:
        B, T, C = x.shape
        w = self.kernel - 1
        _, world = group_rank_size(group) if group is not None else (0, 1)
        n = num_segments(world, layout) // world if world > 1 else 1
        seg = T // n
        xs = x.reshape(B * n, seg, C) if n > 1 else x   # [B·n, seg, C], batch-major as the SP operators
        if world > 1 and w:
            if seg < w:
                raise ValueError(f"the short convolution (kernel {self.kernel}) needs every sequence piece to "
                                 f"hold at least {w} tokens; got pieces of {seg} (layout={layout!r})")
            tails = xs[:, seg - w:].reshape(B, n, w, C).transpose(0, 1)
            halos = HaloExchange.apply(tails, group, layout).transpose(0, 1).reshape(B * n, w, C)
        else:
            halos = xs.new_zeros(B * n, w, C)
        ext = torch.cat([halos, xs], dim=1).transpose(1, 2)            # [B·n, C, w + seg]
        y = F.conv1d(ext, self.weight.to(x.dtype).unsqueeze(1), groups=C)
        return F.silu(y.transpose(1, 2)).reshape(B, T, C)
