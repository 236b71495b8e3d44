"""LASP-2's collective: one all-gather of every rank's fixed-size `[n_local, ...]` state buffer."""
from __future__ import annotations

import torch
import torch.distributed as dist

from longscan.distributed.layouts import group_rank_size
from longscan.distributed.stats import count, nbytes, waiting

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_states(x: torch.Tensor, group=None, async_op: bool = False):
    """x `[n_local, ...]` on every rank -> (`[W · n_local, ...]` in rank order, work handle or None).

    With ``async_op`` the result is valid only after ``work.wait()`` (timed into the comm stats when
    called through :func:`wait`).
    """
    _, world = group_rank_size(group)
    if world == 1:
        return x, None
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    count(sent=(world - 1) * nbytes(x), recv=(world - 1) * nbytes(x))
    with waiting():
        work = _all_gather(out, x.contiguous(), group=group, async_op=async_op)
    return out, work


def wait(work) -> None:
    """Wait for an asynchronous collective (None: nothing to wait for), timed into the comm stats."""
    if work is not None:
        with waiting():
            work.wait()
