"""Packed documents vs one unpacked sequence: chunked linear attention, forward+backward, on one device.

    python benchmarks/packed_linear.py                                          # CPU: torch backend, small sizes
    PYTHONPATH=. python benchmarks/packed_linear.py --total 65536 --doc-len 2048 --heads 16 --head-dim 128 --check

Rows, all over the same ``--total`` tokens (documents of about ``--doc-len`` tokens, lengths drawn in
[doc_len/2, 3·doc_len/2]), a scalar gate per token and head (simple GLA):
- "unpacked": the whole sequence, no documents;
- "packed": ``cu_seqlens`` through ``chunk_linear_attention`` (the torch and Triton backends: resets, log
  decays of -inf);
- "per-document": each document on its own, one call each — what packing should beat.
"x unpacked" is a row's time over the unpacked one. ``--check`` adds the packed output's and gradients' error
against each document alone in float64 (CPU) / float32 (GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.packed_softmax import packing_parser, sizes, time_fb
from longscan.kernels.linear_attention import chunk_linear_attention


def parse_args(argv=None):
    return packing_parser(__doc__.splitlines()[0]).parse_args(argv)


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

    def per_doc():
        return torch.cat([chunk_linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], backend=args.backend)[0]
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)

    t_whole = time_fb(run(None), do, device, args.iters, args.warmup)
    rows = [("unpacked", t_whole), ("packed", time_fb(run(cu), do, device, args.iters, args.warmup)),
            ("per-document", time_fb(per_doc, do, device, args.iters, args.warmup))]
    err = None
    if args.check:
        err = packed_error(q, k, v, g, cu, do, args.backend)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# packed_linear  {name}  {dtype}  T={total} docs={len(lengths)} (mean {mean}, longest {max(lengths)})  "
          f"H={H} D={D}  scalar gate, backend={args.backend}")
    print("| row | ms | x unpacked | rel err |")
    print("|---|---|---|---|")
    for row, t in rows:
        e = f"{err:.1e}" if err is not None and row == "packed" else ""
        print(f"| {row} | {t * 1e3:.2f} | {t / t_whole:.2f} | {e} |")


if __name__ == "__main__":
    main()
