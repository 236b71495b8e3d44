"""Device memory outside PyTorch's allocator that NCCL takes on one GPU: after the process group's start, after
megatron-core's process groups are made, once the four groups a training step uses have run a collective, and
once every group has. --mode bound passes device_id to init_process_group (NCCL then creates a communicator for
every group at once); --mode lazy (what `longscan train` does) leaves each communicator to its first collective.
One mode a process (each needs a fresh CUDA context):

    PYTHONPATH=. python benchmarks/tuning/nccl_memory.py --mode bound
    PYTHONPATH=. python benchmarks/tuning/nccl_memory.py --mode lazy
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def report(mode: str, moment: str) -> None:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    used, reserved = (total - free) / 2**30, torch.cuda.memory_reserved() / 2**30
    print(json.dumps(dict(mode=mode, moment=moment, used_gib=round(used, 3), reserved_gib=round(reserved, 3),
                          outside_pytorch_gib=round(used - reserved, 3))), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("bound", "lazy"), required=True)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/tuning/nccl_memory.py reads a GPU's memory; no CUDA device here")
    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29581").items():
        os.environ.setdefault(key, value)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)
    report(a.mode, "CUDA context")
    dist.init_process_group("nccl", **(dict(device_id=device) if a.mode == "bound" else {}))
    report(a.mode, "init_process_group")
    from megatron.core import parallel_state

    from longscan.training.parallel import init_groups
    ranks = init_groups(1, 1, 1)
    groups = [g for g in vars(parallel_state).values() if isinstance(g, dist.ProcessGroup)]
    report(a.mode, f"megatron's {len(groups)} groups made")
    x = torch.ones(1, device=device)
    for group in (None, ranks.sp_group, ranks.dp_sp_group, ranks.mp_group):
        dist.all_reduce(x, group=group)
    report(a.mode, "the four groups a step uses run")
    for group in groups:
        dist.all_reduce(x, group=group)
    report(a.mode, "every group run")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
