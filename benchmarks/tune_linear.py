"""Sweep the launch settings of the Triton linear-attention kernels on one GPU.

At the benchmark shapes (bf16, 16 heads × 128, 65,536 tokens a step: B=16×T=4096 and B=1×T=65536):
  1. forward and backward alone with the current settings (constant decay without its gradient, as the
     models use it; scalar and per-key gates with theirs);
  2. programs per SM for long single sequences (how many segments the sequence is cut into);
  3. per kernel (fwd, state, dq, dk, dv): tile × warps × pipeline stages, the others at their settings.
Prints one line per setting and the best of each sweep; copy the winners into ``triton_chunk`` by hand
(the sweep decides nothing by itself).

    PYTHONPATH=. python benchmarks/tune_linear.py [--skip-kernels]
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton

from benchmarks.kernels import lin_inputs
from longscan.kernels.linear_attention import triton_chunk as tc

SHAPES = ((16, 4096), (1, 65536))
H, D = 16, 128


def inputs(B, T, kind):
    """The benchmark's inputs (benchmarks/kernels.py) and an output gradient."""
    q, k, v, g, gg = lin_inputs(B, T, H, D, kind)
    return q, k, v, g, gg, torch.randn_like(v)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_forward(x):
    q, k, v, g, gg, _ = x
    return bench(lambda: tc.forward(q, k, v, g, gg))


def time_backward(x, kind):
    """The backward as the autograd op runs it: given the forward's segment states."""
    q, k, v, g, gg, do = x
    _, _, saved = tc.forward(q, k, v, g, gg, return_saved=True)
    return bench(lambda: tc.backward(q, k, v, g, gg, None, None, do, None, kind != "g_gamma", kv_states=saved))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-kernels", action="store_true", help="only phases 1 and 2")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    cases = [(B, T, kind) for B, T in SHAPES for kind in ("g_gamma", "g", "gk")]
    data = {c: inputs(*c) for c in cases}
    for c in cases:
        f, b = time_forward(data[c]), time_backward(data[c], c[2])
        print(f"now {c}: fwd {f:.3f} ms  bwd {b:.3f} ms  fwd+bwd {f + b:.3f} ms", flush=True)

    long_cases = [c for c in cases if c[0] == 1]
    base_pps = tc.PROGRAMS_PER_SM
    for pps in (4, 8, 16):
        tc.PROGRAMS_PER_SM = pps
        ms = [(time_forward(data[c]), time_backward(data[c], c[2])) for c in long_cases]
        print(f"programs/SM={pps}: B=1 fwd/bwd " + "  ".join(f"{c[2]} {f:.3f}/{b:.3f}" for c, (f, b)
                                                            in zip(long_cases, ms)), flush=True)
    tc.PROGRAMS_PER_SM = base_pps
    if args.skip_kernels:
        return

    # constant decay without its gradient and the scalar gate with it, at both shapes
    sweep_cases = [c for c in cases if c[2] in ("g_gamma", "g")]
    base = {n: dict(c) for n, c in tc.CONFIG.items()}
    for name in ("fwd", "state", "dq", "dk", "dv"):
        timer = time_forward if name == "fwd" else None
        results = []
        for block, warps, stages in itertools.product((64, 128), (4, 8), (2, 3)):
            tc.CONFIG[name] = dict(block=block, num_warps=warps, num_stages=stages)
            try:
                ms = [timer(data[c]) if timer else time_backward(data[c], c[2]) for c in sweep_cases]
                if name == "state":   # the state pass runs in the forward too
                    ms = [m + time_forward(data[c]) for m, c in zip(ms, sweep_cases)]
            except Exception as e:  # noqa: BLE001 - a setting that does not compile (shared memory) is skipped
                print(f"{name} block={block} warps={warps} stages={stages}: {type(e).__name__}", flush=True)
                continue
            results.append((sum(ms), block, warps, stages))
            print(f"{name} block={block} warps={warps} stages={stages}: " + " ".join(f"{m:.3f}" for m in ms),
                  flush=True)
        best = min(results)
        print(f"BEST {name}: block={best[1]} warps={best[2]} stages={best[3]} total {best[0]:.3f} ms", flush=True)
        tc.CONFIG[name] = base[name]
    print("cases:", sweep_cases)


if __name__ == "__main__":
    main()
