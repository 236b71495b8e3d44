"""Sweep the launch settings of the Triton linear-attention kernels on one GPU.

At the benchmark shapes (bf16, 16 heads × 128, 65,536 tokens a step: B=16×T=4096 and B=1×T=65536):
  1. forward and backward alone with the current settings (constant decay without its gradient, as the
     models use it; scalar and per-key gates with theirs);
  2. programs per SM for long single sequences (how many segments the sequence is cut into);
  3. per kernel (fwd, state, dq, dk, dv; per-key gates also their pre-pass, ops / ops_b): tile × warps ×
     pipeline stages, the others at their settings.
Every setting runs as a LinearKernelOptions passed to the kernels (nothing global is changed).
Prints one line per setting and the best of each sweep; copy the winners into the defaults
(longscan/kernels/linear_attention/options.py) by hand
(the sweep decides nothing by itself). Every setting is first checked against the current one on a small
problem (FAIL: a miscompile, as Triton 3.6 gave for dv at tile 32 with one stage).

    PYTHONPATH=. python benchmarks/tuning/tune_linear.py [--skip-kernels] [--kinds gk]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
import triton

from benchmarks.kernels import lin_inputs
from longscan.kernels.linear_attention import LaunchConfig, LinearKernelOptions
from longscan.kernels.linear_attention import triton as tc

SHAPES = ((16, 4096), (1, 65536))
H, D = 16, 128


def inputs(B, T, kind):
    """The benchmark's inputs (benchmarks/kernels.py) and an output gradient."""
    q, k, v, g, gg = lin_inputs(B, T, H, D, kind)
    return q, k, v, g, gg, torch.randn_like(v)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_forward(x, opts):
    q, k, v, g, gg, _ = x
    return bench(lambda: tc.forward(q, k, v, g, gg, options=opts))


def time_backward(x, kind, opts):
    """The backward as the autograd op runs it: given the forward's segment states."""
    q, k, v, g, gg, do = x
    _, _, saved = tc.forward(q, k, v, g, gg, return_saved=True, options=opts)
    return bench(lambda: tc.backward(q, k, v, g, gg, None, None, do, None, kind != "g_gamma", kv_states=saved,
                                     options=opts))


def with_setting(opts, per_key, name, cfg):
    """opts with kernel ``name`` launched as cfg (in the per-key table when per_key)."""
    field = "config_per_key" if per_key else "config"
    table = dict(getattr(opts, field))
    table[name] = cfg
    return dataclasses.replace(opts, **{field: table})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-kernels", action="store_true", help="only phases 1 and 2")
    ap.add_argument("--kinds", default="g_gamma,g", help="decay kinds of the phase-3 sweep (gk alone: per-key)")
    ap.add_argument("--stages", default="2,3", help="pipeline stages tried in phase 3")
    ap.add_argument("--sweep-only", action="store_true", help="only phase 3")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    base = LinearKernelOptions()
    cases = [(B, T, kind) for B, T in SHAPES for kind in ("g_gamma", "g", "gk")]
    data = {c: inputs(*c) for c in cases}
    for c in ([] if args.sweep_only else cases):
        f, b = time_forward(data[c], base), time_backward(data[c], c[2], base)
        print(f"now {c}: fwd {f:.3f} ms  bwd {b:.3f} ms  fwd+bwd {f + b:.3f} ms", flush=True)

    long_cases = [c for c in cases if c[0] == 1]
    for pps in (() if args.sweep_only else (4, 8, 16)):
        opts = dataclasses.replace(base, programs_per_sm=pps)
        ms = [(time_forward(data[c], opts), time_backward(data[c], c[2], opts)) for c in long_cases]
        print(f"programs/SM={pps}: B=1 fwd/bwd " + "  ".join(f"{c[2]} {f:.3f}/{b:.3f}" for c, (f, b)
                                                            in zip(long_cases, ms)), flush=True)
    if args.skip_kernels:
        return

    # the swept kinds at both shapes; per-key gates have their own table (config_per_key)
    kinds = args.kinds.split(",")
    if "gk" in kinds and len(kinds) > 1:
        raise SystemExit("--kinds: sweep gk alone (its settings live in config_per_key)")
    per_key = kinds == ["gk"]
    sweep_cases = [c for c in cases if c[2] in kinds]
    probe = inputs(1, 1000, kinds[0])
    # per-key gates also sweep their pre-pass: "ops" without the backward's factors (an inference forward, the
    # state passes), "ops_b" with them (the forward that keeps its operands for the backward, or the backward)
    names = ("fwd", "state", "dq", "dk", "dv") + (("ops", "ops_b") if kinds == ["gk"] else ())
    want = run_probe(probe, kinds[0], base)   # the current settings' result on a small problem
    for name in names:
        timer = time_forward if name in ("fwd", "ops") else None
        results = []
        stage_list = [int(x) for x in args.stages.split(",")]
        for block, warps, stages in itertools.product((32, 64, 128), (4, 8), stage_list):
            opts = with_setting(base, per_key, name, LaunchConfig(block, warps, stages))
            tag = f"{name} block={block} warps={warps} stages={stages}"
            try:
                err = max(rel(a, b) for a, b in zip(run_probe(probe, kinds[0], opts), want) if b is not None)
                if not err <= 1e-2:
                    print(f"{tag}: FAIL (differs from the current setting by {err:.1e})", flush=True)
                    continue
                ms = [timer(data[c], opts) if timer else time_backward(data[c], c[2], opts) for c in sweep_cases]
                if name == "state":   # the state pass runs in the forward too
                    ms = [m + time_forward(data[c], opts) for m, c in zip(ms, sweep_cases)]
            except Exception as e:  # noqa: BLE001 - a setting that does not compile (shared memory) is skipped
                print(f"{tag}: {type(e).__name__}", flush=True)
                continue
            results.append((sum(ms), block, warps, stages))
            print(f"{tag}: " + " ".join(f"{m:.3f}" for m in ms), flush=True)
        best = min(results)
        print(f"BEST {name}: block={best[1]} warps={best[2]} stages={best[3]} total {best[0]:.3f} ms", flush=True)
    print("cases:", sweep_cases)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_probe(x, kind, opts):
    """Forward output, final state and every gradient of a small problem."""
    q, k, v, g, gg, do = x
    o, ht = tc.forward(q, k, v, g, gg, None, None, True, options=opts)
    return (o, ht) + tc.backward(q, k, v, g, gg, None, None, do, None, kind != "g_gamma", options=opts)


if __name__ == "__main__":
    main()
