"""Benchmark the delta-rule SP methods over a group: forward+backward time, communication wait and bytes per rank.

    torchrun --nproc-per-node 4 benchmarks/sp_delta_group.py                 # CPU: gloo, small defaults
    torchrun --nproc-per-node 8 benchmarks/sp_delta_group.py --kind kda --lengths 8192 32768 --n-blocks 2 4 8

For every local length: the local kernel alone on that length (no communication) and each method, ZeCO
once with ``transition="matrix"`` (``zeco``) and once with ``transition="relay"`` for every --n-blocks
(``zeco-relay/N``); times are medians over --iters, the maximum over ranks. A table goes to stdout (rank 0)
and every row to --json. bf16 q, k, v on CUDA (k L2-normalised), float32 β and log gates.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench_common import DTYPES, add_common_args, max_over_ranks, report, setup, time_step
from longscan.kernels.delta_rule import chunk_delta_rule
from longscan.parallel.delta_rule import delta_rule_attention

KINDS = ("deltanet", "gated_deltanet", "kda")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, ["zeco", "zeco-relay", "lasp2"], "zigzag", "sp_delta_group.json")
    p.add_argument("--kind", choices=KINDS, default="gated_deltanet")
    p.add_argument("--n-blocks", nargs="+", type=int, default=[4],
                   help="V blocks of ZeCO's chain (the matrix scan takes the first)")
    return p.parse_args(argv)


def make_inputs(args, T, device, dtype):
    B, H, D = args.batch, args.heads, args.head_dim
    gen = torch.Generator(device=device).manual_seed(dist.get_rank())
    rand = lambda *s: torch.randn(*s, device=device, generator=gen)  # noqa: E731
    q, k, v = rand(B, T, H, D), F.normalize(rand(B, T, H, D), dim=-1), rand(B, T, H, D)
    x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    beta = torch.sigmoid(rand(B, T, H)).requires_grad_()
    g = None
    if args.kind != "deltanet":
        g = (F.logsigmoid(rand(*((B, T, H) if args.kind == "gated_deltanet" else (B, T, H, D)))) / 16).requires_grad_()
    return x, beta, g, rand(B, T, H, D).to(dtype)


def main(argv=None):
    args = parse_args(argv)
    device = setup(29533)
    cuda = device.type == "cuda"
    args.heads = args.heads or (16 if cuda else 2)
    args.head_dim = args.head_dim or (128 if cuda else 32)
    args.lengths = args.lengths or ([8192, 32768] if cuda else [256, 1024])
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    world = dist.get_world_size()
    runs = []
    for method in args.methods:
        if method == "zeco-relay":
            runs += [(f"zeco-relay/{n}", "zeco", "relay", n) for n in args.n_blocks]
        else:
            runs.append((method, method, "matrix", args.n_blocks[0]))
    rows = []
    for T in args.lengths:
        (q, k, v), beta, g, do = make_inputs(args, T, device, dtype)
        local = lambda: chunk_delta_rule(q, k, v, beta, g, backend=args.backend)[0]  # noqa: E731
        base = max_over_ranks(time_step(local, do, device, args), device)[0]
        rows.append(dict(method="local kernel", T_local=T, ms=base * 1e3, wait_ms=0.0, sent=0, recv=0,
                         ratio_to_local=1.0))
        for name, method, transition, n_blocks in runs:
            fn = lambda: delta_rule_attention(q, k, v, beta, g, method=method, layout=args.layout,  # noqa: E731
                                              backend=args.backend, n_blocks=n_blocks, transition=transition)[0]
            med, _, wait, sent, recv = max_over_ranks(time_step(fn, do, device, args), device)
            rows.append(dict(method=name, T_local=T, ms=med * 1e3, wait_ms=wait * 1e3, sent=int(sent),
                             recv=int(recv), ratio_to_local=med / base))
    meta = dict(world_size=world, device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(dtype),
                batch=args.batch, heads=args.heads, head_dim=args.head_dim, kind=args.kind, layout=args.layout,
                backend=args.backend, n_blocks=args.n_blocks, iters=args.iters, torch=torch.__version__)
    report(f"# sp_delta_group  W={world}  {meta['device']}  {meta['dtype']}  B={args.batch} H={args.heads} "
           f"D={args.head_dim}  kind={args.kind}  layout={args.layout}", rows, meta, args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
