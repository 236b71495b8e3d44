"""Benchmark the linear SP methods: forward+backward time, communication wait and bytes per rank.

    torchrun --nproc-per-node 4 benchmarks/sp_linear.py                  # CPU: gloo, small defaults
    torchrun --nproc-per-node 8 benchmarks/sp_linear.py --heads 16 --head-dim 128 --lengths 16384 65536

For every local length: the local kernel alone on that length (no communication: what one GPU of a
W-way split must at least do) and each method; times are medians over --iters, the maximum over ranks.
A table goes to stdout (rank 0) and every row to --json.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from bench_common import DTYPES, add_common_args, max_over_ranks, report, setup, time_step
from longscan.kernels.linear_attention import chunk_linear_attention
from longscan.parallel import linear_attention


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, ["zeco", "lasp2", "lasp1"], "contiguous", "sp_linear.json")
    p.add_argument("--decay", choices=["none", "g_gamma", "g_scalar", "g_per_key"], default="g_gamma")
    p.add_argument("--n-blocks", type=int, default=4)
    p.add_argument("--overlap", action="store_true",
                   help="overlap=True: the collective beside the zero-prefix output pass, then a correction pass "
                        "(default overlap=False: the output pass waits for the collective)")
    return p.parse_args(argv)


def make_inputs(args, T, device, dtype):
    B, H, D = args.batch, args.heads, args.head_dim
    x = [torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    gates = {"none": (None, None),
             "g_gamma": (None, -torch.linspace(0.01, 0.1, H, device=device)),
             "g_scalar": (-0.1 * torch.rand(B, T, H, device=device), None),
             "g_per_key": (-0.1 * torch.rand(B, T, H, D, device=device), None)}
    g, g_gamma = gates[args.decay]
    if g is not None:
        g = g.requires_grad_()   # gates stay float32, as the model passes them
    do = torch.randn(B, T, H, D, device=device, dtype=dtype)
    return x, g, g_gamma, do


def main(argv=None):
    args = parse_args(argv)
    device = setup(29531)
    cuda = device.type == "cuda"
    args.heads = args.heads or (16 if cuda else 4)
    args.head_dim = args.head_dim or (128 if cuda else 32)
    args.lengths = args.lengths or ([4096, 16384] if cuda else [512, 2048])
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    world = dist.get_world_size()
    rows = []
    for T in args.lengths:
        (q, k, v), g, g_gamma, do = make_inputs(args, T, device, dtype)
        local = lambda: chunk_linear_attention(q, k, v, g, g_gamma, backend=args.backend)[0]  # noqa: E731
        base = max_over_ranks(time_step(local, do, device, args), device)[0]
        rows.append(dict(method="local kernel", T_local=T, ms=base * 1e3, wait_ms=0.0, sent=0, recv=0,
                         ratio_to_local=1.0))
        for method in args.methods:
            fn = lambda: linear_attention(q, k, v, g, g_gamma, method=method, layout=args.layout,  # noqa: E731
                                          backend=args.backend, n_blocks=args.n_blocks,
                                          overlap=args.overlap)[0]
            med, _, wait, sent, recv = max_over_ranks(time_step(fn, do, device, args), device)
            rows.append(dict(method=method, T_local=T, ms=med * 1e3, wait_ms=wait * 1e3, sent=int(sent),
                             recv=int(recv), ratio_to_local=med / base))
    meta = dict(world_size=world, device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(dtype),
                batch=args.batch, heads=args.heads, head_dim=args.head_dim, decay=args.decay,
                layout=args.layout, backend=args.backend, n_blocks=args.n_blocks, overlap=args.overlap,
                iters=args.iters,
                torch=torch.__version__)
    report(f"# sp_linear  W={world}  {meta['device']}  {meta['dtype']}  B={args.batch} H={args.heads} "
           f"D={args.head_dim}  decay={args.decay}  layout={args.layout}  overlap={args.overlap}", rows, meta,
           args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
