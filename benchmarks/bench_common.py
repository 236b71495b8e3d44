"""What the benchmarks share: arguments, process-group setup, the timed step, the table writer.

The SP scripts import it by name (`python benchmarks/x.py` and torchrun put the folder on the path);
kernels.py, which the tuning aids import as ``benchmarks.kernels``, imports it as ``benchmarks.bench_common``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from longscan.distributed.layouts import LAYOUTS
from longscan.distributed.stats import STATS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def add_common_args(p: argparse.ArgumentParser, methods: list[str], layout: str, json_name: str) -> None:
    p.add_argument("--methods", nargs="+", default=methods)
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="local lengths (tokens per rank)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--layout", choices=list(LAYOUTS), default=layout)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=json_name)


def setup(port: int) -> torch.device:
    """Initialise torch.distributed from torchrun's variables (a single process without them)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda") if cuda else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def time_step(fn, do, device, args, on_start: Optional[Callable[[], None]] = None) -> tuple:
    """Time ``fn().backward(do)``: (median s, mean s, comm wait s, bytes sent, bytes received), the last
    three per step from ``longscan.distributed.stats``. ``on_start`` runs after the warmup, before the timed
    steps (where a caller resets its own counters)."""
    for _ in range(args.warmup):
        fn().backward(do)
    times = []
    STATS.reset()
    if on_start is not None:
        on_start()
    for _ in range(args.iters):
        sync(device)
        t0 = time.perf_counter()
        fn().backward(do)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    n = args.iters
    return statistics.median(times), sum(times) / n, STATS.wait_s / n, STATS.bytes_sent // n, STATS.bytes_recv // n


def max_over_ranks(values, device) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def kernel_profile(fn: Callable[[], object], reps: int) -> list[tuple[str, int, float]]:
    """fn's CUDA kernels under torch.profiler (one warm-up call, then ``reps`` profiled ones) -> [(kernel name,
    calls a call of fn, µs a call of fn)], largest first."""
    fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    calls: dict[str, int] = {}
    us: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            calls[e.name] = calls.get(e.name, 0) + 1
            us[e.name] = us.get(e.name, 0.0) + e.device_time_total
    return sorted(((n, calls[n] // reps, us[n] / reps) for n in us), key=lambda r: -r[2])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table (the form docs/benchmarks.md records); every row must have the header's width."""
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row {list(r)!r} has {len(r)} cells, the header {len(header)}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def sp_table(rows: list[dict]) -> str:
    """The SP benchmarks' rows (method, T_local, ms, ratio_to_local, wait_ms, sent, recv[, rel_err])."""
    check = any("rel_err" in r for r in rows)
    header = ["method", "T_local", "fwd+bwd ms", "x local", "wait ms", "sent/rank", "recv/rank"]
    cells = [[r["method"], str(r["T_local"]), f"{r['ms']:.2f}", f"{r['ratio_to_local']:.2f}", f"{r['wait_ms']:.2f}",
              f"{r['sent'] / 2**10:.1f} KB", f"{r['recv'] / 2**10:.1f} KB"]
             + ([f"{r['rel_err']:.1e}" if "rel_err" in r else ""] if check else []) for r in rows]
    return markdown_table(header + (["rel err"] if check else []), cells)


def report(title: str, rows: list[dict], meta: dict, path: str) -> None:
    """On rank 0: the table on stdout, meta and rows as JSON to ``path``; then every rank waits, so none
    tears the group down while rank 0 is still writing."""
    if dist.get_rank() == 0:
        print(title)
        print(sp_table(rows))
        with open(path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    dist.barrier()
