"""LASP-2's collective: one all-gather of every rank's fixed-size `[n_local, ...]` state buffer."""
from __future__ import annotations

import torch
import torch.distributed as dist

from longscan.distributed.layouts import group_rank_size

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_states(x: torch.Tensor, group=None, async_op: bool = False):
    """x `[n_local, ...]` on every rank -> (`[W · n_local, ...]` in rank order, work handle or None).

    With ``async_op`` the result is valid only after ``work.wait()``.
    """
    _, world = group_rank_size(group)
    if world == 1:
        return x, None
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    work = _all_gather(out, x.contiguous(), group=group, async_op=async_op)
    return out, work
