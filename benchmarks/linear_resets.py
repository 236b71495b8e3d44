"""What full resets (log decays of -inf, as packed documents bring) cost the linear-attention kernels:
forward+backward of one sequence with and without them, scalar and per-key gates, on one device.

    python benchmarks/linear_resets.py                                          # CPU: torch backend, small sizes
    PYTHONPATH=. python benchmarks/linear_resets.py --total 65536 --doc-len 2048 --heads 16 --head-dim 128 --check

Rows per gate kind (simple GLA's `g [1, T, H]`, GLA's `g [1, T, H, K]`), over the same ``--total`` tokens:
- "no resets": the whole sequence;
- "resets": the same tokens with ``cu_seqlens`` (documents of about ``--doc-len`` tokens, lengths drawn in
  [doc_len/2, 3·doc_len/2]), which enter as -inf at each document's first token.
"x no resets" is a row's time over the first row's. ``--check`` adds the "resets" row's error (output and every
gradient, the largest) against each document alone through the torch backend (float64 on CPU, float32 on GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.packed_linear import packed_error
from benchmarks.packed_softmax import packing_parser, sizes, time_fb
from longscan.kernels.linear_attention import chunk_linear_attention


def main(argv=None):
    args = packing_parser(__doc__.splitlines()[0]).parse_args(argv)
    cuda, device, total, mean, H, D, dtype, lengths = sizes(args, gpu_heads=16)
    cu = torch.tensor([0] + lengths).cumsum(0)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v = (torch.randn(1, total, H, D, device=device, dtype=dtype, generator=gen).mul_(0.3).requires_grad_()
               for _ in range(3))
    do = torch.randn(1, total, H, D, device=device, dtype=dtype, generator=gen)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# linear_resets  {name}  {dtype}  T={total} docs={len(lengths)} (mean {mean}, longest {max(lengths)})  "
          f"H={H} D={D}  backend={args.backend}")
    print("| gate | row | ms | x no resets | rel err |")
    print("|---|---|---|---|---|")
    for kind, shape in (("scalar", (1, total, H)), ("per-key", (1, total, H, D))):
        g = F.logsigmoid(torch.randn(shape, device=device, generator=gen)).div_(16).requires_grad_()

        def run(cu_seqlens):
            return lambda: chunk_linear_attention(q, k, v, g, backend=args.backend, cu_seqlens=cu_seqlens)[0]

        t_whole = time_fb(run(None), do, device, args.iters, args.warmup)
        t_reset = time_fb(run(cu), do, device, args.iters, args.warmup)
        err = ""
        if args.check:
            err = f"{packed_error(q, k, v, g, cu, do, args.backend):.1e}"
        print(f"| {kind} | no resets | {t_whole * 1e3:.2f} | 1.00 | |")
        print(f"| {kind} | resets | {t_reset * 1e3:.2f} | {t_reset / t_whole:.2f} | {err} |")


if __name__ == "__main__":
    main()
