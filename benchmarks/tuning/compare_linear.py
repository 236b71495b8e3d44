"""Time the Triton linear-attention kernels against their own version at an earlier commit, in one process.

Loads the Triton linear-attention kernels as they were at --base (the package
`longscan.kernels.linear_attention.triton`, or the single module `triton_chunk` of older revisions, from
``git archive``) beside the current ones and alternates the two (twice each) at the benchmark shapes: bf16,
16 heads × 128, 65,536 tokens a step (B=1×T=65536 and B=16×T=4096). Forward, and forward+backward as the autograd op runs them (the backward
given the forward's saved segment states; gates with their gradient, the constant decay without).

    PYTHONPATH=. python benchmarks/tuning/compare_linear.py --base e3b00e5 [--kinds gk,g,g_gamma] [--resets 2048]
        [--gamma-grad] [--dtype float32]

--resets N puts a log gate of −inf at every N-th token of the gated kinds (documents of N tokens, as packed
documents bring) and runs both versions with LinearKernelOptions(resets=True) (a base that has the option).
--gamma-grad asks for g_gamma's gradient too (a learnable constant decay); --dtype float32 times float32 q, k, v.
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import torch
import triton

from benchmarks.kernels import lin_inputs
from longscan.kernels.linear_attention import triton as current

# where the kernels' entry module lived: the package, then the single module of older revisions
ENTRY = ("longscan.kernels.linear_attention.triton", "longscan.kernels.linear_attention.triton_chunk")
H, D = 16, 128


def _ours(name: str) -> bool:
    return name == "longscan" or name.startswith("longscan.")


def load_at(rev: str):
    """The kernels' entry module as it was at git revision rev: that revision's longscan package is unpacked
    into a temporary directory and imported there, then the current longscan modules are put back (the old
    module keeps references to its own submodules)."""
    if os.path.isdir(os.path.join(rev, "longscan")):  # an unpacked tree (where the checkout has no git history)
        root = rev
    else:
        root = tempfile.mkdtemp(prefix=f"longscan_{rev}_")
        archive = subprocess.run(["git", "archive", rev, "longscan"], check=True, capture_output=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(root)
    name = next((m for m in ENTRY if os.path.exists(os.path.join(root, *m.split("."))) or
                 os.path.exists(os.path.join(root, *m.split(".")) + ".py")), None)
    if name is None:
        raise SystemExit(f"--base {rev}: no Triton linear-attention kernels found there ({' or '.join(ENTRY)})")
    current_modules = {k: v for k, v in sys.modules.items() if _ours(k)}
    for k in current_modules:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        mod = importlib.import_module(name)
    finally:
        sys.path.remove(root)
        for k in [k for k in sys.modules if _ours(k)]:
            del sys.modules[k]
        sys.modules.update(current_modules)
    return mod


def times(mod, x, kind, resets=False, gamma_grad=False):
    """-> (forward ms, forward+backward ms), medians of do_bench; resets: with the module's options.resets on;
    gamma_grad: g_gamma's gradient asked for too."""
    q, k, v, g, gg, do = x
    opts = dict(options=mod.LinearKernelOptions(resets=True)) if resets else {}
    need_dg = kind != "g_gamma" or gamma_grad

    def fwd_bwd():
        _, _, saved = mod.forward(q, k, v, g, gg, return_saved=True, **opts)
        return mod.backward(q, k, v, g, gg, None, None, do, None, need_dg, kv_states=saved, **opts)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")  # noqa: E731
    return bench(lambda: mod.forward(q, k, v, g, gg, **opts)), bench(fwd_bwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True,
                    help="git revision to compare against, or a directory holding that revision's longscan/")
    ap.add_argument("--kinds", default="g_gamma,g,gk", help="decay kinds (benchmarks/kernels.py's names)")
    ap.add_argument("--resets", type=int, default=None, metavar="N",
                    help="the gated kinds with a log gate of -inf every N tokens, and options.resets on")
    ap.add_argument("--gamma-grad", action="store_true", help="g_gamma with its gradient (a learnable decay)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="q, k, v's dtype")
    args = ap.parse_args()
    if args.resets is not None and args.resets < 1:
        raise SystemExit(f"--resets: expected a positive token count, got {args.resets}")
    base = load_at(args.base)
    print(f"# {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}  "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  base {args.base}"
          f"{f'  resets every {args.resets} tokens' if args.resets else ''}  {args.dtype}"
          f"{'  g_gamma with its gradient' if args.gamma_grad else ''}", flush=True)
    for B, T in ((16, 4096), (1, 65536)):
        for kind in args.kinds.split(","):
            x = lin_inputs(B, T, H, D, kind)
            x = tuple(t.to(getattr(torch, args.dtype)) for t in x[:3]) + tuple(x[3:])
            resets = bool(args.resets) and x[3] is not None
            if resets:
                x[3][:, ::args.resets] = float("-inf")   # a document starts at every N-th token
            x = x + (torch.randn_like(x[2]),)
            for name, mod in (("base", base), ("current", current)) * 2:
                f, fb = times(mod, x, kind, resets, args.gamma_grad)
                print(f"{kind:8s} {B}x{T:<6d} {name:8s} fwd {f:.3f} ms  fwd+bwd {fb:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
