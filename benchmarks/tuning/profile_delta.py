"""Where the delta rule's forward+backward spends its GPU time, kernel by kernel (one GPU).

For each kind (deltanet, gated_deltanet, kda) at each B×T it runs one forward+backward of longscan's
path="wy" kernels (the default for bf16) under torch.profiler (CUDA activity) and prints a compact table a run:
kernel name, calls a step, total µs a step and its share of the step's kernel time; then the same for
flash-linear-attention's chunk_delta_rule / chunk_gated_delta_rule / chunk_kda where it is installed and runs.
Inputs as benchmarks/delta_rule.py makes them (bf16 q, k, v, float32 β and gates, 16 heads × 128).

    PYTHONPATH=. python benchmarks/tuning/profile_delta.py [--shapes 16x4096 1x65536]
        [--kinds deltanet gated_deltanet kda] [--set wy_gate_rows=True] [--no-fla]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from delta_rule import KINDS, inputs, peer  # noqa: E402 (benchmarks/delta_rule.py)

from benchmarks.bench_common import kernel_profile  # noqa: E402
from benchmarks.tuning.delta_compile import set_items  # noqa: E402
from longscan.kernels.delta_rule import chunk_delta_rule  # noqa: E402
from longscan.kernels.delta_rule.triton import DeltaTritonOptions  # noqa: E402

STEPS = 3   # profiled steps (after as many warm-up steps); the table is per step


def kernel_table(step) -> list[tuple[str, int, float]]:
    """-> [(kernel name, calls a step, µs a step)] largest first, from STEPS profiled calls of ``step`` after
    STEPS warm-up calls."""
    for _ in range(STEPS - 1):   # kernel_profile warms up once more
        step()
    return kernel_profile(step, STEPS)


def print_table(title: str, rows: list[tuple[str, int, float]]) -> None:
    total = sum(r[2] for r in rows)
    print(f"== {title}: {total:.0f} µs of kernels a step")
    print(f"   {'kernel':60} {'calls':>5} {'µs':>9} {'share':>6}")
    for name, calls, us in rows:
        print(f"   {name[:60]:60} {calls:5d} {us:9.1f} {100 * us / total:5.1f}%")


def profile_case(kind: str, B: int, T: int, heads: int, head_dim: int, options: DeltaTritonOptions, fla) -> None:
    """Print the tables of one forward+backward of ours at ``options`` and (fla not None) of fla's."""
    x = inputs(kind, B, T, heads, head_dim, "cuda")
    do = torch.randn_like(x["v"])
    leaves = [t for t in x.values() if t is not None]

    def ours():
        o, _ = chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], output_final_state=True,
                                backend="triton", options=options)
        torch.autograd.grad(o, leaves, do)
    print_table(f"longscan {kind} {B}x{T}", kernel_table(ours))
    if fla is None:
        return

    def theirs():
        o, _ = fla(**x)
        torch.autograd.grad(o, leaves, do)
    try:
        print_table(f"fla {kind} {B}x{T}", kernel_table(theirs))
    except Exception as e:   # fla refuses some kinds on some Triton versions: say so, go on
        print(f"== fla {kind} {B}x{T}: failed: {type(e).__name__}: {str(e)[:200]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["16x4096"], help="BxT")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="DeltaTritonOptions fields for longscan's rows (path='wy' unless given)")
    ap.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention's kernels")
    a = ap.parse_args()
    try:   # checked before any work
        options = DeltaTritonOptions(**({"path": "wy"} | set_items(a.set)))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--set: {e}") from None
    shapes = []
    for shape in a.shapes:
        dims = shape.split("x")
        if len(dims) != 2 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise SystemExit(f"--shapes: expected BxT such as 16x4096, got {shape!r}")
        shapes.append((int(dims[0]), int(dims[1])))
    if not torch.cuda.is_available():
        raise SystemExit("profile_delta.py profiles CUDA kernels: it needs a GPU")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {a.heads} heads x {a.head_dim} | {options}")
    for kind in a.kinds:
        for B, T in shapes:
            profile_case(kind, B, T, a.heads, a.head_dim, options, None if a.no_fla else peer(kind))
            torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
