"""What the cross-rank call check costs: ``check_same_call`` alone, and a linear SP step through the public
``linear_attention`` (which checks every call) against the method's own function (which does not).

    torchrun --nproc-per-node 4 benchmarks/call_checks.py [--lengths 4096 16384] [--method zeco]

On NCCL the check's payload lives on the GPU and reading its result waits for the stream; on gloo it
stays on the CPU. Prints one row per local length: the check alone (µs per call), and fwd+bwd ms of both
entry points (their difference is the check's share of a layer's step).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from bench_common import DTYPES, setup, sync, time_step
from longscan.distributed.checks import check_linear_call
from longscan.parallel.linear import lasp1_linear_attention, lasp2_linear_attention, linear_attention, \
    zeco_linear_attention

UNCHECKED = {"zeco": zeco_linear_attention, "lasp2": lasp2_linear_attention, "lasp1": lasp1_linear_attention}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384], help="local lengths (tokens per rank)")
    p.add_argument("--method", choices=tuple(UNCHECKED), default="zeco")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    device = setup(29517)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    B, H, D = args.batch, args.heads, args.head_dim
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} ranks, {dist.get_backend()}, {args.method}, B={B} H={H} D={D} {dtype}")
        print(f"{'T_local':>8}{'check µs':>10}{'checked ms':>12}{'unchecked ms':>14}")
    for T in args.lengths:
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        g = (-0.1 * torch.rand(B, T, H, device=device)).requires_grad_()
        do = torch.randn(B, T, H, D, device=device, dtype=dtype)
        checks = []
        for i in range(args.warmup + args.iters):
            sync(device)
            t0 = time.perf_counter()
            check_linear_call(None, q, k, v, g, None, None, None, False, args.method, "zigzag", 4)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                checks.append(time.perf_counter() - t0)

        def checked():
            return linear_attention(q, k, v, g, method=args.method, layout="zigzag")[0]

        def unchecked():
            return UNCHECKED[args.method](q, k, v, g, layout="zigzag")[0]

        t_checked = time_step(checked, do, device, args)[0]
        t_unchecked = time_step(unchecked, do, device, args)[0]
        if dist.get_rank() == 0:
            print(f"{T:>8}{statistics.median(checks) * 1e6:>10.1f}{t_checked * 1e3:>12.3f}{t_unchecked * 1e3:>14.3f}",
                  flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
