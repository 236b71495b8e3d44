"""The fused elementwise stages of the model's step against the eager code they replace, on one GPU.

  SwiGLU's silu(a) ⊙ b (``longscan.kernels.swiglu``) vs ``F.silu(a) * b``, a, b `[tokens, ffn]`;
  RoPE (``longscan.kernels.rope``) vs the eager rotation (cast to float32, chunk, cat, multiply, cast back),
    on the softmax layers' q `[1, tokens, n_heads, head_dim]` and k `[1, tokens, n_kv_heads, head_dim]`,
    cos/sin `[tokens, head_dim]` float32;
forward (with autograd recording, as in training) and forward+backward, at the model's sizes from --config
(default: the 1B hybrid at 65,536 tokens, bf16). Each row gives the median ms of eager and fused, the fused
op's speed-up, its rate in GB/s over the bytes it must move (its inputs read once, its outputs written once),
and that rate as a fraction of a device-to-device copy's (the memory-bound floor). --check compares the fused
outputs and gradients with the eager ones first.

    PYTHONPATH=. python benchmarks/fused_ops.py                       # configs/hybrid_1b_gpu.yaml, 65,536 tokens
    PYTHONPATH=. python benchmarks/fused_ops.py --check --tokens 131072 --out fused_rows.md
    PYTHONPATH=. python benchmarks/fused_ops.py --tokens 64 --dtype float32 --check --iters 1   # the CPU path
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from benchmarks.bench_common import DTYPES, markdown_table
from longscan.kernels.rope import apply_rope
from longscan.kernels.rope import naive as rope_eager
from longscan.kernels.swiglu import swiglu
from longscan.models.rope import rope_cos_sin
from longscan.training.config import load_config

HEADER = ("op", "shape", "pass", "eager ms", "fused ms", "speed-up", "fused GB/s", "fraction of copy")


@dataclass(frozen=True)
class Case:
    """One op at one shape: ``eager`` and ``fused`` map the inputs to one output; ``grads`` of them are
    taken w.r.t. the inputs that require one. ``bytes_fwd`` / ``bytes_bwd``: what each pass must move."""
    op: str
    shape: str
    inputs: tuple
    eager: Callable
    fused: Callable
    bytes_fwd: int
    bytes_bwd: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/hybrid_1b_gpu.yaml", help="the model's sizes come from here")
    p.add_argument("--tokens", type=int, default=65536, help="tokens on the GPU (the local sequence)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check", action="store_true", help="compare fused and eager outputs and gradients first")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    a = p.parse_args(argv)
    for name in ("tokens", "iters"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    return a


def cases(args, device: torch.device) -> list[Case]:
    m = load_config(args.config).model
    dt, T = DTYPES[args.dtype], args.tokens
    es = torch.empty((), dtype=dt).element_size()
    torch.manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_()
    out = []
    n = T * m.ffn
    out.append(Case("swiglu", f"[{T}, {m.ffn}]", (rand(T, m.ffn, scale=2.0), rand(T, m.ffn)),
                    lambda a, b: F.silu(a) * b, swiglu, 3 * n * es, 5 * n * es))
    cos, sin = rope_cos_sin(torch.arange(T, device=device), m.hd, m.rope_theta)
    tables = 2 * T * m.hd * cos.element_size()
    for name, heads in (("rope q", m.n_heads), ("rope k", m.n_kv_heads)):
        x = rand(1, T, heads, m.hd)
        nx = x.numel()
        out.append(Case(name, f"[1, {T}, {heads}, {m.hd}]", (x,),
                        lambda x: rope_eager.forward(x, cos, sin), lambda x: apply_rope(x, cos, sin),
                        2 * nx * es + tables, 2 * nx * es + tables))
    return out


def timer(device: torch.device, fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median ms of ``fn()`` over ``iters`` calls after ``warmup`` ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def fwd_bwd(f: Callable, inputs: tuple, dy: torch.Tensor) -> Callable[[], tuple]:
    # autograd.grad, not backward(): no accumulation into .grad, which would add a pass to each step
    return lambda: torch.autograd.grad(f(*inputs), inputs, dy)


def check(case: Case, dy: torch.Tensor) -> float:
    """Largest relative L2 difference of the fused output and gradients from the eager ones."""
    got = (case.fused(*case.inputs).detach(), *fwd_bwd(case.fused, case.inputs, dy)())
    want = (case.eager(*case.inputs).detach(), *fwd_bwd(case.eager, case.inputs, dy)())
    return max(((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item()
               for g, w in zip(got, want))


def main(argv: Sequence[str] | None = None) -> list[list[str]]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for case in cases(args, device):
        x0 = case.inputs[0]
        dy = torch.randn(case.eager(*case.inputs).shape, device=device).to(x0.dtype)
        if args.check:
            err = check(case, dy)
            print(f"{case.op} {case.shape}: fused vs eager, largest relative difference {err:.1e}", flush=True)
        src = torch.empty_like(x0, requires_grad=False).copy_(x0.detach())
        dst = torch.empty_like(src)
        copy_ms = timer(device, lambda: dst.copy_(src), args.iters, args.warmup)
        copy_rate = 2 * src.numel() * src.element_size() / copy_ms / 1e6
        for name, make, nbytes in (("fwd", lambda f: (lambda: f(*case.inputs)), case.bytes_fwd),
                                   ("fwd+bwd", lambda f: fwd_bwd(f, case.inputs, dy),
                                    case.bytes_fwd + case.bytes_bwd)):
            eager_ms = timer(device, make(case.eager), args.iters, args.warmup)
            fused_ms = timer(device, make(case.fused), args.iters, args.warmup)
            rate = nbytes / fused_ms / 1e6
            rows.append([case.op, case.shape, name, f"{eager_ms:.3f}", f"{fused_ms:.3f}",
                         f"{eager_ms / fused_ms:.2f}", f"{rate:.0f}", f"{rate / copy_rate:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (torch arithmetic, not the kernels)"
    table = markdown_table(list(HEADER), rows)
    print(f"\n{name}, {args.dtype}, {args.tokens} tokens, copy = device-to-device copy of the op's first input\n")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{name}, {args.dtype}, {args.tokens} tokens\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
