"""Benchmark the linear SP methods: forward+backward time, communication wait and bytes per rank.

    torchrun --nproc-per-node 4 benchmarks/sp_linear.py                  # CPU: gloo, small defaults
    torchrun --nproc-per-node 8 benchmarks/sp_linear.py --heads 16 --head-dim 128 --lengths 16384 65536

For every local length: the local kernel alone on that length (no communication: what one GPU of a
W-way split must at least do) and each method; times are medians over --iters, the maximum over ranks.
A table goes to stdout (rank 0) and every row to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from longscan.distributed.stats import STATS
from longscan.kernels.linear_attention import chunk_linear_attention
from longscan.parallel import linear_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["zeco", "lasp2", "lasp1"])
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="local lengths (tokens per rank)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--decay", choices=["none", "g_gamma", "g_scalar", "g_per_key"], default="g_gamma")
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="contiguous")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--n-blocks", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="sp_linear.json")
    return p.parse_args(argv)


def setup():
    """Initialise torch.distributed from torchrun's variables (a single process without them)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda") if cuda else torch.device("cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def make_inputs(args, T, device, dtype):
    B, H, D = args.batch, args.heads, args.head_dim
    x = [torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    gates = {"none": (None, None),
             "g_gamma": (None, -torch.linspace(0.01, 0.1, H, device=device)),
             "g_scalar": (-0.1 * torch.rand(B, T, H, device=device), None),
             "g_per_key": (-0.1 * torch.rand(B, T, H, D, device=device), None)}
    g, g_gamma = gates[args.decay]
    if g is not None:
        g = g.to(dtype).requires_grad_()
    do = torch.randn(B, T, H, D, device=device, dtype=dtype)
    return x, g, g_gamma, do


def time_step(fn, do, device, args):
    """Median seconds of forward+backward and the per-step comm counters (averaged over --iters)."""
    for _ in range(args.warmup):
        fn().backward(do)
    times = []
    STATS.reset()
    for _ in range(args.iters):
        sync(device)
        t0 = time.perf_counter()
        fn().backward(do)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    n = args.iters
    return statistics.median(times), STATS.wait_s / n, STATS.bytes_sent // n, STATS.bytes_recv // n


def max_over_ranks(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def main(argv=None):
    args = parse_args(argv)
    device = setup()
    cuda = device.type == "cuda"
    args.heads = args.heads or (16 if cuda else 4)
    args.head_dim = args.head_dim or (128 if cuda else 32)
    args.lengths = args.lengths or ([4096, 16384] if cuda else [512, 2048])
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for T in args.lengths:
        (q, k, v), g, g_gamma, do = make_inputs(args, T, device, dtype)
        local = lambda: chunk_linear_attention(q, k, v, g, g_gamma, backend=args.backend)[0]
        base = max_over_ranks(time_step(local, do, device, args), device)
        rows.append(dict(method="local kernel", T_local=T, ms=base[0] * 1e3, wait_ms=0.0, sent=0, recv=0))
        for method in args.methods:
            fn = lambda: linear_attention(q, k, v, g, g_gamma, method=method, layout=args.layout,
                                          backend=args.backend, n_blocks=args.n_blocks)[0]
            ms, wait, sent, recv = max_over_ranks(time_step(fn, do, device, args), device)
            rows.append(dict(method=method, T_local=T, ms=ms * 1e3, wait_ms=wait * 1e3, sent=int(sent),
                             recv=int(recv)))
        for r in rows:
            if r["T_local"] == T:
                r["ratio_to_local"] = r["ms"] / (base[0] * 1e3)
    meta = dict(world_size=world, device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(dtype),
                batch=args.batch, heads=args.heads, head_dim=args.head_dim, decay=args.decay,
                layout=args.layout, backend=args.backend, n_blocks=args.n_blocks, iters=args.iters,
                torch=torch.__version__)
    if rank == 0:
        print(f"# sp_linear  W={world}  {meta['device']}  {meta['dtype']}  B={args.batch} H={args.heads} "
              f"D={args.head_dim}  decay={args.decay}  layout={args.layout}")
        print(f"{'method':<13}{'T_local':>9}{'fwd+bwd ms':>12}{'x local':>9}{'wait ms':>10}"
              f"{'sent/rank':>12}{'recv/rank':>12}")
        for r in rows:
            print(f"{r['method']:<13}{r['T_local']:>9}{r['ms']:>12.2f}{r['ratio_to_local']:>9.2f}"
                  f"{r['wait_ms']:>10.2f}{r['sent'] / 2**10:>10.1f}KB{r['recv'] / 2**10:>10.1f}KB")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    dist.barrier()   # no rank tears the group down while rank 0 is still writing
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
