"""Registers, spills and shared memory of the Triton linear-attention kernels, compiled without a GPU.

Compiles each main kernel (forward, dq, dk, dv) for a CUDA target (default sm_90a, the H100 / H200) with
the launch settings and state-product modes the dispatch picks at the benchmark shapes (bf16, head dims 128,
no entering state, gates with their gradient, the constant decay without), runs Triton's own ptxas on its
PTX with -v, and prints what ptxas reports. A kernel at the 255-register limit that spills, or whose shared
memory keeps it alone on an SM, is where a change can pay: the per-key dk kernel went from 308 bytes of spills
to 4 by storing dk before its gate terms, and the per-key forward from 131 KB of shared memory to 40 KB at one
pipeline stage (in the benchmark record's git history), both found here and then timed on the GPU.

The numbers are those of the installed Triton: install the GPU's version (3.6 on the H100 and H200 of docs/benchmarks.md) for numbers
that match it (they did at 7a27ade's settings: per-key forward 210 registers and 131,072 bytes of shared memory,
dk 255 and 114,688, as the GPU reported).

    PYTHONPATH=. python benchmarks/tuning/kernel_resources.py [--kinds g_gamma,g,gk] [--kernels fwd,dq,dk,dv] [--arch 90]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from longscan.kernels.linear_attention import LinearKernelOptions
from longscan.kernels.linear_attention.triton import bwd, fwd, plan

KINDS = {"none": 0, "g_gamma": 1, "g": 2, "gk": 3}
D = 128
# float32 pointer arguments of each kernel (the others are in q's dtype, bf16 here); g too for the
# gated kinds (the scalar gate in float32, the per-key chunk totals)
F32_ARGS = {"fwd": ("h0", "ht"), "dq": ("h0", "gq", "st"), "dk": ("dhe", "hin", "gk", "dg", "term", "dh0"),
            "dv": ("dhe",)}
KERNELS = {"fwd": fwd._fwd_kernel, "dq": bwd._bwd_dq_kernel, "dk": bwd._bwd_dk_kernel, "dv": bwd._bwd_dv_kernel}


def constants(name: str, gate: int, opts: LinearKernelOptions = LinearKernelOptions()) -> tuple[dict, dict]:
    """-> (constexpr arguments, launch options) of kernel ``name`` as the dispatch sets them (opts: the
    kernels' options, the defaults unless given)."""
    block, cfg = plan._launch(name, D, gate, opts)
    need_dg = gate >= 2   # gates with their gradient; the constant decay without (as the models use it)
    c = dict(K=D, V=D, C=opts.chunk_for(gate == 3), GATE=gate, PREC="tf32")
    if name == "fwd":
        c.update(BV=block, HAS_H0=False, STORE_HT=False)
    elif name == "dv":
        c.update(BV=block, HAS_DHE=False)
    else:
        mode = plan._state_products(name, gate, torch.bfloat16, need_dg, opts)
        c.update(BK=block, NEED_DG=need_dg, SF32=mode, SPREC="tf32")
        c.update(dict(HAS_H0=False, STORE_ST=False) if name == "dq" else dict(HAS_DHE=False, HAS_TERM=False))
    return c, cfg


def resources(name: str, gate: int, arch: int) -> dict:
    """Compile one kernel -> {"registers", "spill_stores", "spill_loads", "shared"} (bytes for the last three)."""
    fn = KERNELS[name]
    consts, cfg = constants(name, gate)
    f32 = set(F32_ARGS[name]) | ({"g"} if gate >= 2 else set())
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in ("T", "H", "SEG", "NC"):
            sig[a] = "i32"
        elif a == "scale":
            sig[a] = "fp32"
        else:
            sig[a] = "*fp32" if a in f32 else "*bf16"
    # what the launcher's specialisation gives at the benchmark shapes: pointers and sizes divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a] == "i32" or
             sig[a].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg)
    ptxas = get_ptxas(arch).path   # the ptxas Triton itself uses for this target (its PTX version's)
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([ptxas, "-v", "--gpu-name", gpu, ptx, "-o", os.path.join(d, "kernel.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not read ptxas's report for {name}:\n{log}")
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)), shared=kernel.metadata.shared)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="g_gamma,g,gk", help=f"decay kinds, of {sorted(KINDS)}")
    ap.add_argument("--kernels", default="fwd,dq,dk,dv", help=f"of {sorted(KERNELS)}")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    args = ap.parse_args()
    if plan._interpreting():
        raise SystemExit("kernel_resources.py compiles the kernels: unset TRITON_INTERPRET")
    kinds, names = args.kinds.split(","), args.kernels.split(",")
    for flag, values, known in (("--kinds", kinds, KINDS), ("--kernels", names, KERNELS)):
        for x in values:
            if x not in known:   # before any compiling
                raise SystemExit(f"{flag}: unknown {flag[2:-1]} {x!r}, expected one of {sorted(known)}")
    print(f"# triton {triton.__version__}, sm_{args.arch}, bf16, head dims {D}")
    for kind in kinds:
        for name in names:
            r = resources(name, KINDS[kind], args.arch)
            print(f"{kind:8s} {name:4s} registers {r['registers']:3d}  spills {r['spill_stores']:4d} / "
                  f"{r['spill_loads']:4d} bytes (stores / loads)  shared {r['shared']:6d} bytes", flush=True)


if __name__ == "__main__":
    main()
