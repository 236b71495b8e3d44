"""A barrier over the default process group on this rank's device."""
from __future__ import annotations

import torch
import torch.distributed as dist


def barrier() -> None:
    """dist.barrier on this rank's device: NCCL process groups started without ``device_id`` (their
    communicators made at first use) are not bound to a device, so it is named here rather than guessed from
    the rank."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
