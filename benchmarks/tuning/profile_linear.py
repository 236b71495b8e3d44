"""Where the Triton linear-attention forward and backward spend their time, kernel by kernel (one GPU).

For each decay kind at the benchmark shapes (bf16, 16 heads × 128, 65,536 tokens a step) it runs the
forward and the backward (with and without the gate gradient) under torch.profiler and prints the device
time of every kernel per call, so a slow piece stands out.

    PYTHONPATH=. python benchmarks/tuning/profile_linear.py [--shapes 16x4096,1x65536] [--kinds g_gamma,g,gk]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.bench_common import kernel_profile
from benchmarks.tuning.tune_linear import H, D, inputs
from longscan.kernels.linear_attention import triton as tc

REPS = 5


def kernel_times(fn):
    """-> (total ms per call, [(kernel name, ms per call)] largest first)."""
    rows = kernel_profile(fn, REPS)
    return sum(us for _, _, us in rows) / 1e3, [(name[:60], us / 1e3) for name, _, us in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16x4096,1x65536")
    ap.add_argument("--kinds", default="g_gamma,g,gk")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}  bf16  H={H} D={D}")
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        for kind in args.kinds.split(","):
            q, k, v, g, gg, do = inputs(B, T, kind)
            _, _, saved = tc.forward(q, k, v, g, gg, return_saved=True)
            runs = {"fwd": lambda: tc.forward(q, k, v, g, gg),
                    "bwd no dg": lambda: tc.backward(q, k, v, g, gg, None, None, do, None, False, kv_states=saved)}
            if kind != "g_gamma":
                runs["bwd with dg"] = lambda: tc.backward(q, k, v, g, gg, None, None, do, None, True, kv_states=saved)
            for name, fn in runs.items():
                total, items = kernel_times(fn)
                print(f"{B}x{T} {kind} {name}: {total:.3f} ms of kernels | "
                      + " | ".join(f"{n} {ms:.3f}" for n, ms in items[:8]), flush=True)
            del q, k, v, g, gg, do
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
