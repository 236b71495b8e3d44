"""Benchmark the softmax SP methods: forward+backward time, communication wait and bytes per rank.

    torchrun --nproc-per-node 4 benchmarks/sp_softmax.py                  # CPU: gloo, small defaults
    torchrun --nproc-per-node 8 benchmarks/sp_softmax.py --heads 32 --kv-heads 8 --head-dim 128 --lengths 8192 32768

For every local length T: the local kernel on the whole sequence W·T run on one rank, divided by W — the
ideal time of a W-way split of the same work (the ring-flash-attention anchor: zigzag reaches ~90% of it
on 8 GPUs) — and each method; "x local" is a method's time over that ideal. Times are medians over --iters,
the maximum over ranks; wait and bytes are per step, from ``longscan.distributed.stats``. Ulysses' all-to-alls
run inside DeepSpeed and block, so its wait is its time minus the time spent in its local attention, which
this script times around the method's hooks (a :class:`TimedUlysses`; the library has no timing hooks).
A table goes to stdout (rank 0) and every row to --json.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import time

from bench_common import DTYPES, add_common_args, max_over_ranks, rel_err, report, setup, time_step
from longscan.distributed.layouts import shard
from longscan.kernels.softmax_attention import attention
from longscan.parallel.softmax import METHODS, SoftmaxSPOptions, softmax_attention
from longscan.parallel.softmax.ulysses import Ulysses


class TimedUlysses(Ulysses):
    """Ulysses with the seconds spent in its local attention (forward + backward hooks) summed in ``local_s``."""

    def __init__(self):
        self.local_s = 0.0

    def forward(self, q, k, v, opts):
        t0 = time.perf_counter()
        res = super().forward(q, k, v, opts)
        self.local_s += time.perf_counter() - t0
        return res

    def backward(self, do, q, k, v, o, lse, opts):
        t0 = time.perf_counter()
        res = super().backward(do, q, k, v, o, lse, opts)
        self.local_s += time.perf_counter() - t0
        return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, list(METHODS), "zigzag", "sp_softmax.json")
    p.add_argument("--kv-heads", type=int, default=None, help="GQA kv heads (default: --heads)")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--chunk-heads", type=int, default=None, help="kv heads per all-gather (allgather)")
    p.add_argument("--check", action="store_true",
                   help="also report each method's max relative error (o, dq, dk, dv, worst rank) against the "
                        "whole sequence on one rank")
    return p.parse_args(argv)


def make_inputs(args, T, device, dtype, seed=0):
    """q, k, v (leaves) and do of length T, the same on every rank (same seed)."""
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device=device).manual_seed(seed)
    x = [torch.randn(B, T, h, D, device=device, dtype=dtype, generator=gen).requires_grad_() for h in (H, Hkv, Hkv)]
    return x, torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen)


def check_error(fn, q, k, v, do, qg, kg, vg, dog, args):
    """Max relative L2 error of this rank's o, dq, dk, dv against the whole sequence computed on one rank
    by the torch backend in float64 (CPU) / float32 (GPU); the inputs are this rank's shards of qg, kg, vg."""
    ref_dtype = torch.float64 if qg.device.type == "cpu" else torch.float32
    g = qg.shape[2] // kg.shape[2]
    o_ref, g_ref = [], [[], [], []]
    for h in range(kg.shape[2]):     # one kv head (and its query heads) at a time: bounded memory
        hq = slice(h * g, (h + 1) * g)
        leaves = [x.detach()[:, :, s].to(ref_dtype).requires_grad_() for x, s in ((qg, hq), (kg, [h]), (vg, [h]))]
        o = attention(*leaves, causal=args.causal, backend="torch")
        for acc, grad in zip(g_ref, torch.autograd.grad(o, leaves, dog[:, :, hq].to(ref_dtype))):
            acc.append(grad)
        o_ref.append(o.detach())
    o_ref, g_ref = torch.cat(o_ref, dim=2), [torch.cat(x, dim=2) for x in g_ref]
    sh = lambda t: shard(t, 1, None, args.layout)  # noqa: E731
    o = fn()
    grads = torch.autograd.grad(o, (q, k, v), do)
    errs = [rel_err(o, sh(o_ref))] + [rel_err(a, sh(b)) for a, b in zip(grads, g_ref)]
    return max(errs)


def time_ulysses(q, k, v, do, device, args):
    """``bench_common.time_step`` of method="ulysses" plus the seconds per timed step inside its local
    attention."""
    timed = TimedUlysses()
    opts = SoftmaxSPOptions(scale=q.shape[-1] ** -0.5, causal=args.causal, layout=args.layout, backend=args.backend)
    fn = lambda: timed.attend(q, k, v, opts)  # noqa: E731

    def restart():
        timed.local_s = 0.0

    res = time_step(fn, do, device, args, on_start=restart)
    return res + (timed.local_s / args.iters,)


def main(argv=None):
    args = parse_args(argv)
    device = setup(29532)
    cuda = device.type == "cuda"
    args.heads = args.heads or (32 if cuda else 4)
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or (128 if cuda else 32)
    args.lengths = args.lengths or ([8192, 32768] if cuda else [256, 512])
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    world = dist.get_world_size()
    rows = []
    for T in args.lengths:
        # The same work on one rank: the whole sequence, every rank at once (so they contend for the
        # machine as the SP ranks do), divided by W.
        (qg, kg, vg), dog = make_inputs(args, T * world, device, dtype)
        full = lambda: attention(qg, kg, vg, causal=args.causal, backend=args.backend)  # noqa: E731
        ideal = max_over_ranks(time_step(full, dog, device, args), device)[0] / world
        rows.append(dict(method="local kernel", T_local=T, ms=ideal * 1e3, wait_ms=0.0, sent=0, recv=0,
                         ratio_to_local=1.0))
        q, k, v = (shard(x.detach(), 1, None, args.layout).requires_grad_() for x in (qg, kg, vg))
        do = shard(dog, 1, None, args.layout)
        for method in args.methods:
            kw = dict(chunk_heads=args.chunk_heads) if method == "allgather" else {}
            fn = lambda: softmax_attention(q, k, v, causal=args.causal, method=method, layout=args.layout,  # noqa: E731
                                           backend=args.backend, **kw)
            if method == "ulysses":      # blocking all-to-alls inside DeepSpeed: everything but local attention
                med, mean, wait, sent, recv, local_s = max_over_ranks(time_ulysses(q, k, v, do, device, args),
                                                                      device)
                wait = max(mean - local_s, 0.0)
            else:
                med, mean, wait, sent, recv = max_over_ranks(time_step(fn, do, device, args), device)
            row = dict(method=method, T_local=T, ms=med * 1e3, wait_ms=wait * 1e3, sent=int(sent),
                       recv=int(recv), ratio_to_local=med / ideal)
            if args.check:
                row["rel_err"] = max_over_ranks([check_error(fn, q, k, v, do, qg, kg, vg, dog, args)], device)[0]
            rows.append(row)
        del qg, kg, vg, dog
    meta = dict(world_size=world, device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(dtype),
                batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                causal=args.causal, layout=args.layout, backend=args.backend, chunk_heads=args.chunk_heads,
                iters=args.iters, torch=torch.__version__,
                local_kernel="single-rank kernel on the whole W·T sequence, divided by W (ideal split)")
    report(f"# sp_softmax  W={world}  {meta['device']}  {meta['dtype']}  B={args.batch} H={args.heads} "
           f"Hkv={args.kv_heads} D={args.head_dim}  causal={args.causal}  layout={args.layout}", rows, meta,
           args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
