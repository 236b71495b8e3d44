"""Time the Triton linear-attention kernels under several LinearKernelOptions in one process, on one GPU.

At the benchmark shapes (bf16 unless --dtype, 16 heads × 128, 65,536 tokens a step: B=1×T=65536 and
B=16×T=4096), forward and forward+backward as the autograd op runs them (the backward given the forward's saved records; gates with their
gradient, the constant decay without, as benchmarks/kernels.py and compare_linear.py), for the defaults and each
--options value (benchmarks/accuracy_linear.py's syntax: FIELD=VALUE items, or a preset such as
per_key_dq_split), alternating the settings, each twice. Every setting is first checked against the defaults on
a small problem (its outputs and gradients must agree to bf16 round-off).

    PYTHONPATH=. python benchmarks/tuning/time_linear_options.py --options dq_factor_f32=true per_key_dq_split \
        dq_scores_split=false [--kinds gk,g_gamma] [--dtype float32]

--dtype float32 times float32 q, k, v (e.g. --options float32_products=tf32x3); the check then reports the
difference to the defaults against float32's round-off.
"""
from __future__ import annotations

import argparse
import time

import torch
import triton

from benchmarks.accuracy_linear import options_of
from benchmarks.kernels import LINEAR_KINDS, lin_inputs
from longscan.kernels.linear_attention import LinearKernelOptions
from longscan.kernels.linear_attention import triton as tc

SHAPES = ((1, 65536), (16, 4096))
H, D = 16, 128


def fwd_bwd(x, kind, opts):
    q, k, v, g, gg, do = x
    _, _, saved = tc.forward(q, k, v, g, gg, return_saved=True, options=opts)
    return tc.backward(q, k, v, g, gg, None, None, do, None, kind != "g_gamma", kv_states=saved, options=opts)


def times(x, kind, opts) -> tuple[float, float]:
    """-> (forward ms, forward+backward ms), medians of do_bench."""
    q, k, v, g, gg, _ = x
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")  # noqa: E731
    return bench(lambda: tc.forward(q, k, v, g, gg, options=opts)), bench(lambda: fwd_bwd(x, kind, opts))


def inputs(B, T, kind, dtype):
    """lin_inputs with q, k, v in ``dtype``, and an output gradient like v."""
    x = lin_inputs(B, T, H, D, kind)
    x = tuple(t.to(dtype) for t in x[:3]) + tuple(x[3:])
    return x + (torch.randn_like(x[2]),)


def check(kind, opts, dtype) -> float:
    """The largest error of opts' results against the defaults' on a small problem, relative to each tensor's
    largest value."""
    x = inputs(2, 1024, kind, dtype)
    base, got = fwd_bwd(x, kind, LinearKernelOptions()), fwd_bwd(x, kind, opts)
    return max(((y.float() - r.float()).abs().max() / r.float().abs().max()).item()
               for y, r in zip(got, base) if r is not None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--options", nargs="+", required=True, metavar="ITEMS",
                    help="one setting a value, timed beside the defaults (benchmarks/accuracy_linear.py's syntax)")
    ap.add_argument("--kinds", default=",".join(LINEAR_KINDS), help=f"decay kinds, of {LINEAR_KINDS}")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="q, k, v's dtype")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in LINEAR_KINDS:
            raise SystemExit(f"--kinds: unknown kind {kind!r}, expected one of {LINEAR_KINDS}")
    settings = [("defaults", LinearKernelOptions())] + [options_of(text) for text in args.options]
    print(f"# {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}  "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {args.dtype}", flush=True)
    for kind in kinds:
        for name, opts in settings[1:]:
            err = check(kind, opts, dtype)
            bound = 3e-2 if dtype == torch.bfloat16 else 1e-4
            print(f"{kind:8s} {name}: largest difference to the defaults {err:.1e}"
                  + (f"  (more than {args.dtype} round-off)" if err > bound else ""), flush=True)
    for B, T in SHAPES:
        for kind in kinds:
            x = inputs(B, T, kind, dtype)
            for name, opts in settings * 2:
                f, fb = times(x, kind, opts)
                print(f"{kind:8s} {B}x{T:<6d} {name:40s} fwd {f:.3f} ms  fwd+bwd {fb:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
