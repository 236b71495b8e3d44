"""Measure the per-token kernel costs `longscan plan` predicts compute from, on this GPU (needs CUDA).

    PYTHONPATH=. python benchmarks/kernel_costs.py [--head-dims 64,128] [--out longscan/observe/costs/h100.json]
    PYTHONPATH=. python benchmarks/kernel_costs.py --variants deltanet,gated_deltanet,kda --update

Writes a table (forward + backward, bf16):
- matmul_flops_per_s: achieved FLOP/s of the model's projections (x·Wᵀ with its two backward matmuls) at
  widths 2048 and 4096, 16,384 tokens; the median over the shapes;
- linear_s_per_token_head[variant][head_dim]: the chunked linear-attention kernel (Triton) of each decay kind,
  and the delta rule's (Triton, its default path: wy for bf16) of each of its kinds, 1 × 32,768 tokens × 16
  heads, divided by tokens · heads;
- softmax_s_per_pair_head[head_dim]: causal scaled_dot_product_attention (flash), 1 × 8,192 tokens × 16 heads,
  divided by the T(T+1)/2 query-key pairs · heads;
- copy_bytes_per_s: a device-to-device copy of 1 GiB, bytes read plus written per second (the rate of the
  step's memory-bound work: norms, residual adds, activations, casts, the optimizer);
- memory_bytes: the device's total memory.
The default output is longscan/observe/costs/<gpu>.json with <gpu> = h100 or h200 from the device name.
``--variants`` measures only those linear variants; ``--update`` merges what this run measures into the table
already at the output path (the rest of it, and its device, date and commit, kept; the merged rows' commit and
date listed under "updates").
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess

import torch
import torch.nn.functional as F

LINEAR_VARIANTS = ("linear", "lightning", "simple_gla", "gla")
DELTA_VARIANTS = ("deltanet", "gated_deltanet", "kda")
VARIANTS = LINEAR_VARIANTS + DELTA_VARIANTS


def timed(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds of fn() over ``iters`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def matmul_rate(tokens: int = 16384) -> float:
    rates = []
    for d in (2048, 4096):
        for n in (d, 3 * d, 8 * d // 3 // 64 * 64):
            x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)

            def step():
                F.linear(x, w).backward(gy)
            rates.append(6 * tokens * d * n / timed(step))
    return statistics.median(rates)


def copy_rate(n_bytes: int = 1 << 30) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n_bytes / timed(lambda: dst.copy_(src))


def log_gate(shape, per_key: bool, head_dim: int) -> torch.Tensor:
    """Log decays in (-inf, 0), shallow (logsigmoid / 16): `[*shape]` a head, or `[*shape, head_dim]` a key."""
    full = (*shape, head_dim) if per_key else tuple(shape)
    return F.logsigmoid(torch.randn(full, device="cuda")).div_(16).requires_grad_()


def linear_cost(variant: str, head_dim: int, T: int = 32768, H: int = 16) -> float:
    from longscan.kernels.linear_attention import chunk_linear_attention
    dev, bf = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, T, H, head_dim, device=dev, dtype=bf).mul_(0.1).requires_grad_() for _ in range(3))
    g = g_gamma = None
    if variant == "lightning":
        g_gamma = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, device=dev, dtype=torch.float32)))
    elif variant in ("simple_gla", "gla"):
        g = log_gate((1, T, H), variant == "gla", head_dim)
    do = torch.randn(1, T, H, head_dim, device=dev, dtype=bf)

    def step():
        o = chunk_linear_attention(q, k, v, g=g, g_gamma=g_gamma, backend="triton")[0]
        o.backward(do)
    return timed(step) / (T * H)


def delta_cost(variant: str, head_dim: int, T: int = 32768, H: int = 16) -> float:
    from longscan.kernels.delta_rule import chunk_delta_rule
    dev, bf = "cuda", torch.bfloat16
    q, v = (torch.randn(1, T, H, head_dim, device=dev, dtype=bf).mul_(0.1).requires_grad_() for _ in range(2))
    k = F.normalize(torch.randn(1, T, H, head_dim, device=dev), dim=-1).to(bf).requires_grad_()
    beta = torch.rand(1, T, H, device=dev).requires_grad_()
    g = log_gate((1, T, H), variant == "kda", head_dim) if variant in ("gated_deltanet", "kda") else None
    do = torch.randn(1, T, H, head_dim, device=dev, dtype=bf)

    def step():
        chunk_delta_rule(q, k, v, beta, g, backend="triton")[0].backward(do)
    return timed(step) / (T * H)


def merged(old: dict, new: dict, variants) -> dict:
    """``old`` with ``new``'s rows of the linear ``variants`` in place of its own, and the run noted."""
    out = dict(old)
    out["linear_s_per_token_head"] = {**old.get("linear_s_per_token_head", {}),
                                      **{v: new["linear_s_per_token_head"][v] for v in variants}}
    out["updates"] = old.get("updates", []) + [{"variants": list(variants), "device_name": new["device_name"],
                                                "torch": new["torch"], "date": new["date"], "commit": new["commit"]}]
    return out


def softmax_cost(head_dim: int, T: int = 8192, H: int = 16) -> float:
    q, k, v = (torch.randn(1, H, T, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn(1, H, T, head_dim, device="cuda", dtype=torch.bfloat16)

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
    return timed(step) / (T * (T + 1) / 2 * H)


def gpu_key(name: str) -> str:
    for key in ("H200", "H100"):
        if key in name.upper():
            return key.lower()
    raise SystemExit(f"kernel_costs.py: no table name for GPU {name!r} (known: H100, H200); pass --out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="linear variants to measure")
    ap.add_argument("--update", action="store_true", help="merge the measured variants into the existing table")
    a = ap.parse_args()
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"kernel_costs.py: --variants: unknown variant {bad[0]!r}; choose from "
                         f"{', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("kernel_costs.py measures GPU kernels: no CUDA device here")
    name = torch.cuda.get_device_name()
    dims = [int(x) for x in a.head_dims.split(",")]
    table = {"gpu": gpu_key(name) if a.out is None else os.path.splitext(os.path.basename(a.out))[0],
             "device_name": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
             "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip(),
             "linear_s_per_token_head": {v: {str(d): (delta_cost if v in DELTA_VARIANTS else linear_cost)(v, d)
                                             for d in dims} for v in variants}}
    if not a.update:   # a whole table: the device and the other kernels too
        table.update(memory_bytes=torch.cuda.get_device_properties(0).total_memory, dtype="bfloat16",
                     matmul_flops_per_s=matmul_rate(), copy_bytes_per_s=copy_rate(),
                     softmax_s_per_pair_head={str(d): softmax_cost(d) for d in dims})
    out = a.out or os.path.join(os.path.dirname(__file__), "..", "longscan", "observe", "costs",
                                f"{table['gpu']}.json")
    if a.update:
        with open(out) as f:
            table = merged(json.load(f), table, variants)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
    print(json.dumps(table, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
