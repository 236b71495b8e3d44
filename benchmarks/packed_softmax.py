"""Packed documents vs one unpacked sequence: softmax SP (ring, zigzag) forward+backward on one process.

    python benchmarks/packed_softmax.py                                    # CPU: torch backend, small sizes
    python benchmarks/packed_softmax.py --total 65536 --doc-len 2048 --heads 32 --kv-heads 8 --head-dim 128

Rows, all over the same ``--total`` tokens (one rank, so the ring is one step and the time is the kernel's):
- "unpacked": causal attention over the whole sequence (no documents);
- "packed": the same tokens with ``cu_seqlens`` (documents of about ``--doc-len`` tokens, lengths drawn in
  [doc_len/2, 3·doc_len/2]): the document mask and the block skipping;
- "per-document": each document attended on its own, one call each, summed — the work packing must reach;
- "batched": the tokens as a batch of sequences of the mean document length, no documents (when it divides
  ``--total``): what the same kernels do with work of that shape and no document masks.
"x per-doc" is a row's time over the per-document time; "work" is the fraction of the causal score matrix
a row needs; "rate" is the row's work per second over the unpacked row's (the fraction of its FLOP rate).
``--check`` adds the packed output's and gradients' error against the per-document float64 (CPU) / float32
(GPU) reference. A table goes to stdout and every row to --json.

``--world W`` adds the ring over W ranks, its compute run rank by rank in this one process (no transfers:
what each rank's kernels take in its W steps, forward and backward): "ring W, slowest rank" is the ring's
critical path without communication, its "efficiency" the one-rank row's time / (W × the slowest rank's),
and "max/mean" the ranks' imbalance ("pairs max/mean": the busiest rank's visible (query, key) pairs over the
mean, the imbalance of the work itself). That efficiency is what a multi-GPU ring can reach when its transfers
hide behind the compute. ``--balance`` adds, for each W, the packed ring with the documents in the order
``balance.balanced_order`` picks for W ranks (what ``data.balance_documents`` trains with; its efficiency is
over the given order's one-rank time). ``--profile`` adds the slowest rank of the largest ring under
torch.profiler and each of its steps timed alone (to its kernels' end on a GPU) with the kernel calls of the
step's plan.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from longscan.distributed.balance import balanced_order, reorder_documents
from longscan.distributed.documents import causal_pairs_per_rank, global_positions
from longscan.distributed.layouts import shard
from longscan.kernels.softmax_attention import attention
from longscan.parallel.softmax import softmax_attention
from longscan.parallel.softmax.common import sp_documents
from longscan.parallel.softmax.ring import backward_step, forward_step, ring_steps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def packing_parser(description: str) -> argparse.ArgumentParser:
    """The arguments the packed-document benchmarks share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--total", type=int, default=None, help="tokens in the sequence (default 65536 GPU, 2048 CPU)")
    p.add_argument("--doc-len", type=int, default=None, help="mean document length (default 2048 GPU, 128 CPU)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--backend", default="auto", help="auto: triton on CUDA, torch on CPU")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true")
    return p


def parse_args(argv=None):
    p = packing_parser(__doc__.splitlines()[0])
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--world", type=int, nargs="*", default=[],
                   help="also the ring over these numbers of ranks, run rank by rank on this device")
    p.add_argument("--balance", action="store_true",
                   help="with --world: also the packed ring with the documents in the balanced order for each W")
    p.add_argument("--profile", action="store_true",
                   help="with --world: the slowest rank of the largest ring, unpacked and packed, under torch.profiler")
    p.add_argument("--json", default="packed_softmax.json")
    a = p.parse_args(argv)
    if any(w < 2 for w in a.world):
        p.error(f"--world takes ring sizes >= 2, got {a.world}")
    if a.balance and not a.world:
        p.error("--balance orders the documents for the ring's ranks: give --world too")
    if a.profile and not a.world:
        p.error("--profile profiles the ring's ranks: give --world too")
    return a


class RingByRank:
    """The zigzag ring's compute over ``world`` ranks, one rank at a time in one process: rank r's W forward
    steps and then its W backward steps, each the ring's own step (``forward_step`` / ``backward_step``) on
    that rank's shard and the visiting rank's K/V; no transfers. q, k, v, do: the global `[1, T, ·, D]`."""

    def __init__(self, q, k, v, do, cu_seqlens, world: int, layout: str = "zigzag", backend: str = "auto"):
        self.world, self.layout, self.backend = world, layout, backend
        self.t_local = q.shape[1] // world
        self.pos = [global_positions(self.t_local, world, r, layout).to(q.device) for r in range(world)]
        self.q, self.k, self.v, self.do = ([x[:, p].contiguous() for p in self.pos] for x in (q, k, v, do))
        self.scale = q.shape[-1] ** -0.5
        cu = None if cu_seqlens is None else cu_seqlens.to("cpu", torch.int64)
        self.docs = sp_documents(cu, self.t_local, world, layout, True, q.device)

    def rank(self, r: int, timer=None):
        """Rank r's work -> (o, dq, {src rank: (dk, dv) of its block}) in the compute dtype. ``timer``: called
        as timer(label) after each step (the per-step table of --profile)."""
        tick = timer or (lambda label: None)
        steps = ring_steps(r, self.world, self.layout, True, self.docs, self.t_local)
        out = lse = None
        for i, step in enumerate(steps):
            out, lse = forward_step(out, lse, self.q[r], self.k[step.src], self.v[step.src], step, self.scale,
                                    self.backend)
            tick(("forward", i, step.src))
        o = out.to(self.q[r].dtype)
        tick(("cast o", None, None))
        dq, blocks = None, {}
        steps = ring_steps(r, self.world, self.layout, True, self.docs, self.t_local)   # the ring's backward's own
        for i, step in enumerate(steps):
            dq, dk, dv = backward_step(dq, self.do[r], self.q[r], self.k[step.src], self.v[step.src], o, lse, step,
                                       self.scale, self.backend, self.world > 1)
            blocks[step.src] = (dk, dv)
            tick(("backward", i, step.src))
        return out, dq, blocks

    def step_table(self, r: int, iters: int) -> str:
        """Median ms of each of rank r's steps, each timed to its kernels' end, with the calls its plan makes."""
        times: dict = {}
        sync = torch.cuda.synchronize if self.q[r].is_cuda else (lambda: None)
        for it in range(iters + 1):
            sync()
            last = [time.perf_counter()]

            def timer(label):
                sync()
                now = time.perf_counter()
                if it:                                       # the first run warms up
                    times.setdefault(label, []).append((now - last[0]) * 1e3)
                last[0] = now
            self.rank(r, timer)
        plans = [step.plan for step in ring_steps(r, self.world, self.layout, True, self.docs, self.t_local)]
        lines = ["| phase | step | from rank | ms | calls (q rows x k rows, mask, document ids) |", "|---|---|---|---|---|"]
        for (phase, step, src), ms in times.items():
            calls = ""
            if src is not None:
                calls = ", ".join(f"{c.q.stop - c.q.start}x{c.k.stop - c.k.start} {c.mask}{' docs' if c.docs else ''}"
                                  for c in plans[step])
            lines.append(f"| {phase} | {'' if step is None else step} | {'' if src is None else src} "
                         f"| {statistics.median(ms):.3f} | {calls} |")
        return "\n".join(lines)

    def whole(self):
        """Every rank's work gathered into the global (o, dq, dk, dv): what the ring computes."""
        o, dq, dk, dv = (None,) * 4
        for r in range(self.world):
            o_r, dq_r, blocks = self.rank(r)
            if o is None:
                o = o_r.new_zeros(1, self.world * self.t_local, *o_r.shape[2:])
                dq = o.new_zeros(1, o.shape[1], *dq_r.shape[2:])
                dk = o.new_zeros(1, o.shape[1], *self.k[0].shape[2:])
                dv = o.new_zeros(1, o.shape[1], *self.v[0].shape[2:])
            o[:, self.pos[r]], dq[:, self.pos[r]] = o_r.to(o.dtype), dq_r.to(o.dtype)
            for src, (dk_b, dv_b) in blocks.items():
                if dk_b is not None:
                    dk[:, self.pos[src]] += dk_b.to(o.dtype)
                    dv[:, self.pos[src]] += dv_b.to(o.dtype)
        return o, dq, dk, dv


def doc_lengths(total: int, mean: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    out, left = [], total
    while left:
        n = int(torch.randint(max(1, mean // 2), mean + mean // 2 + 1, (1,), generator=gen))
        out.append(min(n, left))
        left -= out[-1]
    return out


def time_fb(fn, do, device, iters, warmup) -> float:
    """Median seconds of fn().backward(do)."""
    return time_call(lambda: fn().backward(do), device, iters, warmup)


def time_call(fn, device, iters, warmup) -> float:
    """Median seconds of fn()."""
    return time_wall_host(fn, device, iters, warmup)[0]


def time_wall_host(fn, device, iters, warmup) -> tuple[float, float]:
    """Median seconds of fn() to its last kernel's end, and of fn() returning on the host (its launches and
    host work; close to the first where the host is the bottleneck)."""
    for _ in range(warmup):
        fn()
    walls, hosts = [], []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls), statistics.median(hosts)


def sizes(args, gpu_heads: int):
    """(cuda, device, total, mean document length, heads, head dim, dtype, document lengths): the arguments with
    the GPU or CPU defaults filled in."""
    cuda = torch.cuda.is_available()
    total = args.total or (65536 if cuda else 2048)
    mean = args.doc_len or (2048 if cuda else 128)
    return (cuda, torch.device("cuda" if cuda else "cpu"), total, mean, args.heads or (gpu_heads if cuda else 4),
            args.head_dim or (128 if cuda else 32), DTYPES[args.dtype or ("bfloat16" if cuda else "float32")],
            doc_lengths(total, mean, args.seed))


def main(argv=None):
    args = parse_args(argv)
    cuda, device, total, mean, H, D, dtype, lengths = sizes(args, gpu_heads=32)
    Hkv = args.kv_heads or H
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v = (torch.randn(1, total, h, D, device=device, dtype=dtype, generator=gen).requires_grad_()
               for h in (H, Hkv, Hkv))
    do = torch.randn(1, total, H, D, device=device, dtype=dtype, generator=gen)
    backend = args.backend
    if backend == "auto" and cuda:
        backend = "triton"           # the one CUDA kernel that takes documents; the unpacked row uses it too
    loc = [shard(x.detach(), 1, None, "zigzag").requires_grad_() for x in (q, k, v)]
    do_loc = shard(do, 1, None, "zigzag")

    def ring(cu_seqlens):
        return lambda: softmax_attention(*loc, causal=True, method="ring", layout="zigzag", backend=backend,
                                         cu_seqlens=cu_seqlens)

    def per_doc():
        outs = [attention(q[:, a:b], k[:, a:b], v[:, a:b], causal=True, backend=backend)
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs, 1)

    causal_work = total * (total + 1) / 2
    doc_work = sum(n * (n + 1) / 2 for n in lengths)
    t_doc = time_fb(per_doc, do, device, args.iters, args.warmup)
    rows = []
    for name, fn, work in (("unpacked", ring(None), 1.0), ("packed", ring(cu), doc_work / causal_work)):
        t = time_fb(fn, do_loc, device, args.iters, args.warmup)
        rows.append(dict(row=name, ms=t * 1e3, x_per_doc=t / t_doc, work=work))
    rows.append(dict(row="per-document", ms=t_doc * 1e3, x_per_doc=1.0, work=doc_work / causal_work))
    if total % mean == 0:
        n = total // mean
        batch = [x.detach().reshape(n, mean, *x.shape[2:]).requires_grad_() for x in (q, k, v)]
        t = time_fb(lambda: softmax_attention(*batch, causal=True, method="ring", layout="zigzag", backend=backend),
                    do.reshape(n, mean, *do.shape[2:]), device, args.iters, args.warmup)
        rows.append(dict(row=f"batched ({n} x {mean})", ms=t * 1e3, x_per_doc=t / t_doc,
                         work=n * mean * (mean + 1) / 2 / causal_work))
    for r in rows:
        r["rate"] = r["work"] * rows[0]["ms"] / r["ms"]
    by_one_rank = {"unpacked": rows[0]["ms"], "packed": rows[1]["ms"]}
    profiles = []
    for W in args.world:
        # (row name, cu_seqlens, the one-rank row its efficiency is over)
        rings = [("unpacked", None, "unpacked"), ("packed", cu, "packed")]
        if args.balance:
            rings.append(("packed, balanced", reorder_documents(cu, balanced_order(cu.diff(), W, "zigzag"))[0],
                          "packed"))
        for name, c, one_rank in rings:
            ring_w = RingByRank(q.detach(), k.detach(), v.detach(), do, c, W, backend=backend)
            timed = [time_wall_host(lambda: ring_w.rank(r), device, args.iters, args.warmup) for r in range(W)]
            ms = [wall * 1e3 for wall, _ in timed]
            slowest = max(ms)
            pairs = causal_pairs_per_rank(torch.tensor([0, total]) if c is None else c, total, W, "zigzag")
            rows.append(dict(row=f"{name}, ring {W}, slowest rank", ms=slowest, x_per_doc=slowest / (t_doc * 1e3),
                             host_ms=timed[ms.index(slowest)][1] * 1e3,
                             work=rows[0 if c is None else 1]["work"] / W, rate=None, ranks_ms=ms,
                             efficiency=by_one_rank[one_rank] / (W * slowest),
                             max_over_mean=slowest / statistics.mean(ms),
                             pairs_max_over_mean=max(pairs) / statistics.mean(pairs)))
            if args.profile and W == max(args.world):
                from benchmarks.packed_linear import profile_tables   # (that module imports this one)
                r = ms.index(slowest)
                steps = ring_w.step_table(r, args.iters)
                profiles.append(f"## {name}, ring {W}, rank {r}: {args.iters} runs of its forward and backward steps\n"
                                + profile_tables(lambda: ring_w.rank(r), device, args.iters) + "\n" + steps)
    if args.check:
        ref_dtype = torch.float64 if not cuda else torch.float32
        leaves = [x.detach().to(ref_dtype).requires_grad_() for x in (q, k, v)]
        o_ref = torch.cat([attention(*(x[:, a:b] for x in leaves), causal=True, backend="torch")
                           for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
        g_ref = torch.autograd.grad(o_ref, leaves, do.to(ref_dtype))
        o = ring(cu)()
        grads = torch.autograd.grad(o, loc, do_loc)
        sh = lambda t: shard(t, 1, None, "zigzag").double()  # noqa: E731
        err = lambda a, b: ((a.double() - sh(b)).norm() / sh(b).norm()).item()  # noqa: E731
        rows[1]["rel_err"] = max([err(o, o_ref)] + [err(a, b) for a, b in zip(grads, g_ref)])
    title = (f"# packed_softmax  {torch.cuda.get_device_name() if cuda else 'cpu'}  {dtype}  T={total} "
             f"docs={len(lengths)} (mean {mean})  H={H} Hkv={Hkv} D={D}  ring/zigzag, 1 process, backend={backend}")
    print(title)
    print("| row | ms | x per-doc | work | rate | rel err | efficiency | max/mean | pairs max/mean | host ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
        rate = f"{r['rate']:.2f}" if r["rate"] is not None else ""
        ring = (f"{r['efficiency']:.2f} | {r['max_over_mean']:.2f} | {r['pairs_max_over_mean']:.3f}"
                if "efficiency" in r else " | | ")
        host = f"{r['host_ms']:.2f}" if "host_ms" in r else ""
        print(f"| {r['row']} | {r['ms']:.2f} | {r['x_per_doc']:.2f} | {r['work']:.3f} | {rate} | {err} | {ring} "
              f"| {host} |")
    for text in profiles:
        print("\n" + text)
    with open(args.json, "w") as f:
        json.dump(dict(title=title, rows=rows, lengths=lengths, torch=torch.__version__), f, indent=1)


if __name__ == "__main__":
    main()
