"""Packed documents vs one unpacked sequence: chunked linear attention, forward+backward, on one device.

    python benchmarks/packed_linear.py                                          # CPU: torch backend, small sizes
    PYTHONPATH=. python benchmarks/packed_linear.py --total 65536 --doc-len 2048 --heads 16 --head-dim 128 --check
    PYTHONPATH=. python benchmarks/packed_linear.py --total 65536 --doc-len 2048 --heads 16 --head-dim 128 --profile
    PYTHONPATH=. python benchmarks/packed_linear.py --total 16384 --doc-len 2048 --heads 16 --head-dim 128 --states \
        --count

Rows, all over the same ``--total`` tokens (documents of about ``--doc-len`` tokens, lengths drawn in
[doc_len/2, 3·doc_len/2]), a scalar gate per token and head (simple GLA):
- "unpacked": the whole sequence, no documents;
- "packed": ``cu_seqlens`` through ``chunk_linear_attention`` (the torch and Triton backends: resets, log
  decays of -inf);
- "packed, states" (with ``--states``): the same with an initial state per document and the final states
  `[N, H, K, V]` (their gradients too);
- "per-document": each document on its own, one call each — what packing should beat.
"x unpacked" is a row's time over the unpacked one. ``--check`` adds the packed output's and gradients' error
against each document alone in float64 (CPU) / float32 (GPU), and with ``--states`` the states row's (final
states and the initial states' gradients too). ``--profile`` then runs each row under
torch.profiler and prints its 12 largest CUDA kernels (on a GPU, with the count of host synchronisations in one
forward+backward) and CPU ops by time. ``--count`` times nothing: it counts each packed row's kernel launches,
bytes allocated and elements read in one forward+backward, what the states row adds by operator, and what the
packed row adds to the unpacked one (on a CPU too).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.packed_softmax import packing_parser, sizes, time_fb
from longscan.kernels.linear_attention import chunk_linear_attention

PROFILE_ROWS = 12


def parse_args(argv=None):
    p = packing_parser(__doc__.splitlines()[0])
    p.add_argument("--states", action="store_true", help="add a row with per-document initial and final states")
    p.add_argument("--profile", action="store_true",
                   help=f"print each row's {PROFILE_ROWS} largest CUDA kernels and CPU ops (torch.profiler)")
    p.add_argument("--count", action="store_true",
                   help="instead of timing, print each row's operator count and bytes allocated in one "
                        "forward+backward, by operator (torch.profiler; on a CPU too: each operator is what a GPU "
                        "would launch)")
    return p.parse_args(argv)


def count_syncs(step) -> int:
    """How many operations of one step() make the host wait for the GPU (torch's sync debug mode warns once per
    such operation)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_tables(step, device, iters: int) -> str:
    """``iters`` runs of step() (e.g. a forward+backward) under torch.profiler -> the tables of the largest CUDA
    kernels (on a GPU) and CPU ops, by their own time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    tables = []
    if device.type == "cuda":
        tables.append(f"host synchronisations in one step: {count_syncs(step)}")
        tables.append("CUDA kernels:\n" + events.table(sort_by="self_cuda_time_total", row_limit=PROFILE_ROWS))
    tables.append("CPU ops:\n" + events.table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS))
    return "\n".join(tables)


# operators that launch nothing on a GPU: allocations (their bytes count for the operator that asked for them),
# views, and conversions that find nothing to convert
_ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::resize_", "aten::empty_like", "aten::new_empty",
                "aten::new_empty_strided"}
_NO_WORK = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t", "aten::transpose",
            "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::permute",
            "aten::alias", "aten::detach", "aten::unflatten", "aten::lift_fresh", "aten::result_type", "aten::to",
            "aten::_to_copy", "aten::resolve_conj", "aten::resolve_neg", "aten::flatten", "aten::contiguous",
            "aten::_unsafe_view", "aten::view_as", "aten::expand_as", "aten::split", "aten::unbind", "aten::chunk",
            "aten::narrow", "aten::as_strided_", "aten::detach_", "aten::is_nonzero", "aten::item"}


def op_counts(fn, do) -> dict:
    """One fn().backward(do) under torch.profiler, after one uncounted call (what a first call builds and caches
    is not counted) -> {operator: [launches, bytes allocated, elements read]}. A launch is an aten operator that
    does work and calls no other operator that does: a kernel launch on a GPU. Its bytes allocated are its
    outputs' (an allocation made outside any launch counts for the operator that made it); its elements read are
    its tensor inputs' sizes."""
    from torch.profiler import ProfilerActivity, profile
    fn().backward(do)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn().backward(do)

    def works(e):
        return e.name.startswith("aten::") and e.name not in _ALLOCATIONS and e.name not in _NO_WORK

    def launches(e):   # does work, and nothing below it does
        return works(e) and not any(works(d) for d in _descendants(e))

    def inside_launch(e):
        while e is not None and not launches(e):
            e = e.cpu_parent
        return e is not None
    by_name: dict = {}
    for e in prof.events():
        if launches(e):
            row = by_name.setdefault(e.name, [0, 0, 0])
            row[0] += 1
            row[1] += max(e.cpu_memory_usage, 0)
            row[2] += sum(math.prod(shape) for shape in e.input_shapes if shape)
        elif e.name in _ALLOCATIONS and not inside_launch(e):
            owner = e.cpu_parent or e
            by_name.setdefault(owner.name, [0, 0, 0])[1] += max(e.cpu_memory_usage, 0)
    return by_name


def _descendants(e):
    for c in e.cpu_children:
        yield c
        yield from _descendants(c)


def count_table(rows) -> str:
    """rows: [(row name, op_counts(...))], the first the base -> a table per row, then what every later row adds to
    the first, by operator."""
    def total(c, i):
        return sum(x[i] for x in c.values())
    lines = ["| row | launches | MB allocated | M elements read |", "|---|---|---|---|"]
    lines += [f"| {row} | {total(c, 0)} | {total(c, 1) / 2 ** 20:.0f} | {total(c, 2) / 1e6:.0f} |" for row, c in rows]
    base_row, base = rows[0]
    for row, c in rows[1:]:
        extra = {n: [x[i] - base.get(n, [0, 0, 0])[i] for i in range(3)] for n, x in c.items()}
        extra = sorted(((n, x) for n, x in extra.items() if any(x)), key=lambda kv: (-kv[1][1] - kv[1][2], -kv[1][0]))
        lines.append(f"\n{row}, beyond {base_row}: launches {total(c, 0) - total(base, 0)}, MB allocated "
                     f"{(total(c, 1) - total(base, 1)) / 2 ** 20:.0f}, M elements read "
                     f"{(total(c, 2) - total(base, 2)) / 1e6:.0f}; by operator (launches, MB allocated, M read):\n" +
                     ", ".join(f"{n.removeprefix('aten::')} {x[0]:+d}x {x[1] / 2 ** 20:+.0f} {x[2] / 1e6:+.0f}"
                               for n, x in extra))
    return "\n".join(lines)


def packed_error(q, k, v, g, cu, do, backend) -> float:
    """The largest relative error of the packed call's output and gradients of q, k, v, g against each document
    run alone through the torch backend in float32 (GPU) or float64 (CPU)."""
    ref_dtype = torch.float32 if q.is_cuda else torch.float64
    leaves = [x.detach().to(ref_dtype).requires_grad_() for x in (q, k, v, g)]
    o_ref = torch.cat([chunk_linear_attention(*(x[:, a:b] for x in leaves), backend="torch")[0]
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    refs = (o_ref,) + torch.autograd.grad(o_ref, leaves, do.to(ref_dtype))
    o = chunk_linear_attention(q, k, v, g, backend=backend, cu_seqlens=cu)[0]
    got = (o,) + torch.autograd.grad(o, (q, k, v, g), do)
    return max(((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(got, refs))


def states_error(q, k, v, g, h0, cu, do, dfinal, backend) -> float:
    """The same with per-document states: the largest relative error of the output, the final states and the
    gradients of q, k, v, g and the initial states against each document run alone from its initial state."""
    ref_dtype = torch.float32 if q.is_cuda else torch.float64
    leaves = [x.detach().to(ref_dtype).requires_grad_() for x in (q, k, v, g, h0)]
    runs = [chunk_linear_attention(*(x[:, a:b] for x in leaves[:4]), initial_state=leaves[4][i:i + 1],
                                   output_final_state=True, backend="torch")
            for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))]
    o_ref, s_ref = torch.cat([o for o, _ in runs], 1), torch.cat([s for _, s in runs], 0)
    loss = (o_ref * do.to(ref_dtype)).sum() + (s_ref * dfinal.to(ref_dtype)).sum()
    refs = (o_ref, s_ref) + torch.autograd.grad(loss, leaves)
    o, s = chunk_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend,
                                  cu_seqlens=cu)
    got = (o, s) + torch.autograd.grad((o * do).sum() + (s * dfinal.to(s.dtype)).sum(), (q, k, v, g, h0))
    return max(((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(got, refs))


def main(argv=None):
    args = parse_args(argv)
    cuda, device, total, mean, H, D, dtype, lengths = sizes(args, gpu_heads=16)
    cu = torch.tensor([0] + lengths).cumsum(0)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v = (torch.randn(1, total, H, D, device=device, dtype=dtype, generator=gen).mul_(0.3).requires_grad_()
               for _ in range(3))
    g = F.logsigmoid(torch.randn(1, total, H, device=device, generator=gen)).div_(16).requires_grad_()
    do = torch.randn(1, total, H, D, device=device, dtype=dtype, generator=gen)

    def run(cu_seqlens):
        return lambda: chunk_linear_attention(q, k, v, g, backend=args.backend, cu_seqlens=cu_seqlens)[0]

    h0 = torch.randn(len(lengths), H, D, D, device=device, generator=gen).mul_(0.1).requires_grad_()

    def with_states():
        o, final = chunk_linear_attention(q, k, v, g, initial_state=h0, output_final_state=True,
                                          backend=args.backend, cu_seqlens=cu)
        return o + final.sum() * 0      # the final states join the backward (a zero gradient, the same work)

    def per_doc():
        return torch.cat([chunk_linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], backend=args.backend)[0]
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)

    fns = [("unpacked", run(None)), ("packed", run(cu))] + ([("packed, states", with_states)] if args.states else [])
    fns.append(("per-document", per_doc))
    if args.count:      # counts only: no timing (on a CPU the timings would take far longer than the counts)
        print(f"# packed_linear --count  T={total} docs={len(lengths)}  H={H} D={D}  {dtype}  backend={args.backend}")
        counts = {row: op_counts(fn, do) for row, fn in fns if row in ("unpacked", "packed", "packed, states")}
        print(count_table([(row, c) for row, c in counts.items() if row != "unpacked"]))
        # what packing itself adds to the same call without documents (the Triton kernels' own launches are not
        # aten operators: this counts the host's work around them)
        print("\n" + count_table([(row, counts[row]) for row in ("unpacked", "packed")]))
        return
    rows = [(row, time_fb(fn, do, device, args.iters, args.warmup)) for row, fn in fns]
    t_whole = rows[0][1]
    errs = {}
    if args.check:
        errs["packed"] = packed_error(q, k, v, g, cu, do, args.backend)
        if args.states:
            dfinal = torch.randn(h0.shape, device=device, generator=gen)
            errs["packed, states"] = states_error(q, k, v, g, h0, cu, do, dfinal, args.backend)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# packed_linear  {name}  {dtype}  T={total} docs={len(lengths)} (mean {mean}, longest {max(lengths)})  "
          f"H={H} D={D}  scalar gate, backend={args.backend}")
    print("| row | ms | x unpacked | rel err |")
    print("|---|---|---|---|")
    for row, t in rows:
        e = f"{errs[row]:.1e}" if row in errs else ""
        print(f"| {row} | {t * 1e3:.2f} | {t / t_whole:.2f} | {e} |")
    if args.profile:
        for row, fn in fns:
            tables = profile_tables(lambda: fn().backward(do), device, args.iters)
            print(f"\n## {row}: {args.iters} runs of forward+backward\n{tables}")


if __name__ == "__main__":
    main()
