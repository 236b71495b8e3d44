"""Time the Triton linear-attention kernels against their own version at an earlier commit, in one process.

Loads `longscan/kernels/linear_attention/triton_chunk.py` as it was at --base (``git show``) beside the
current one and alternates the two (twice each) at the benchmark shapes: bf16, 16 heads × 128, 65,536 tokens
a step (B=1×T=65536 and B=16×T=4096). Forward, and forward+backward as the autograd op runs them (the backward
given the forward's saved segment states; gates with their gradient, the constant decay without).

    PYTHONPATH=. python benchmarks/tuning/compare_linear.py --base e3b00e5 [--kinds gk,g,g_gamma]
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time

import torch
import triton

from benchmarks.kernels import lin_inputs
from longscan.kernels.linear_attention import triton_chunk as current

PATH = "longscan/kernels/linear_attention/triton_chunk.py"
H, D = 16, 128


def load_at(rev: str):
    """The kernels module as it was at git revision rev."""
    src = subprocess.run(["git", "show", f"{rev}:{PATH}"], check=True, capture_output=True, text=True).stdout
    f = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    f.write(src)
    f.close()
    spec = importlib.util.spec_from_file_location(f"triton_chunk_{rev}", f.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod    # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def times(mod, x, kind):
    """-> (forward ms, forward+backward ms), medians of do_bench."""
    q, k, v, g, gg, do = x

    def fwd_bwd():
        _, _, saved = mod.forward(q, k, v, g, gg, return_saved=True)
        return mod.backward(q, k, v, g, gg, None, None, do, None, kind != "g_gamma", kv_states=saved)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")  # noqa: E731
    return bench(lambda: mod.forward(q, k, v, g, gg)), bench(fwd_bwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--kinds", default="g_gamma,g,gk", help="decay kinds (benchmarks/kernels.py's names)")
    args = ap.parse_args()
    base = load_at(args.base)
    print(f"# {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}  "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  base {args.base}", flush=True)
    for B, T in ((16, 4096), (1, 65536)):
        for kind in args.kinds.split(","):
            x = lin_inputs(B, T, H, D, kind)
            x = x + (torch.randn_like(x[2]),)
            for name, mod in (("base", base), ("current", current)) * 2:
                f, fb = times(mod, x, kind)
                print(f"{kind:8s} {B}x{T:<6d} {name:8s} fwd {f:.3f} ms  fwd+bwd {fb:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
