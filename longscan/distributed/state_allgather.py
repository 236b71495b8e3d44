"""LASP-2's collective: one all-gather of every rank's fixed-size `[n_local, ...]` state buffer."""
from __future__ import annotations

import torch
import torch.distributed as dist

from longscan.distributed.layouts import group_rank_size
from longscan.distributed.stats import count, nbytes, waiting

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_states(x: torch.Tensor, group=None) -> torch.Tensor:
    """x `[n_local, ...]` on every rank -> `[W · n_local, ...]`, the ranks' buffers in rank order."""
    _, world = group_rank_size(group)
    if world == 1:
        return x
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    count(sent=(world - 1) * nbytes(x), recv=(world - 1) * nbytes(x), kind="state_allgather")
    with waiting("state_allgather"):
        _all_gather(out, x.contiguous(), group=group)
    return out
