"""Registers, spills and shared memory of the Triton linear-attention kernels, compiled without a GPU.

Compiles each main kernel (forward, dq, dk, dv; also the state pass and the per-key pre-pass) for a CUDA target
(default sm_90a, the H100 / H200) with the launch settings and state-product modes the dispatch picks at the
benchmark shapes (bf16, head dims 128, no entering state, gates with their gradient, the constant decay without;
--dtype, --dims and --states pick others), runs Triton's own ptxas on its
PTX with -v, and prints what ptxas reports. A kernel at the 255-register limit that spills, or whose shared
memory keeps it alone on an SM, is where a change can pay: the per-key dk kernel went from 308 bytes of spills
to 4 by storing dk before its gate terms, and the per-key forward from 131 KB of shared memory to 40 KB at one
pipeline stage (in the benchmark record's git history), both found here and then timed on the GPU.

The numbers are those of the installed Triton: install the GPU's version (3.6 on the H100 and H200 of docs/benchmarks.md) for numbers
that match it (they did at 7a27ade's settings: per-key forward 210 registers and 131,072 bytes of shared memory,
dk 255 and 114,688, as the GPU reported).

    PYTHONPATH=. python benchmarks/tuning/kernel_resources.py [--kinds g_gamma,g,gk] [--kernels fwd,dq,dk,dv] [--arch 90]
        [--resets]
"""
from __future__ import annotations

import argparse
import dataclasses
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
from longscan.kernels.linear_attention.triton import bwd, fwd, gates, plan, state

KINDS = {"none": 0, "g_gamma": 1, "g": 2, "gk": 3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
D = 128
# float32 pointer arguments of each kernel (the others are in q's dtype); g too for the gated kinds (the scalar
# gate in float32, the per-key chunk totals)
F32_ARGS = {"fwd": ("h0", "ht"), "dq": ("h0", "gq", "st"), "dk": ("dhe", "hin", "gk", "dg", "term", "dh0"),
            "dv": ("dhe",), "state": ("out_s", "out_a"), "ops": ("gl",), "ops_b": ("gl",)}
KERNELS = {"fwd": fwd._fwd_kernel, "dq": bwd._bwd_dq_kernel, "dk": bwd._bwd_dk_kernel, "dv": bwd._bwd_dv_kernel,
           "state": state._state_kernel, "ops": gates._gate_operands_kernel, "ops_b": gates._gate_operands_kernel}
# the pointer types Triton names each dtype by
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel compiled as the dispatch launches it: its inputs' dtype, head dims, decay kind, whether the
    gate gradient is asked for (None: for the gated kinds, not for the constant decay, as the models use them)
    and whether states enter and leave (an initial state, a final state and its gradient); resets: compiled to
    take log gates of −inf (options.resets), where the kernel has that switch."""
    name: str
    gate: int
    dtype: torch.dtype = torch.bfloat16
    K: int = D
    V: int = D
    need_dg: bool | None = None
    states: bool = False
    resets: bool = False
    from_start: bool = False     # the state pass over (q, do) that the backward runs (state kernel only)

    def __post_init__(self):
        if self.name not in KERNELS:
            raise ValueError(f"Case.name: unknown kernel {self.name!r}, expected one of {sorted(KERNELS)}")
        if self.name.startswith("ops") and self.gate != 3:
            raise ValueError(f"Case: the pre-pass {self.name!r} runs for per-key gates only (gate 3), got {self.gate}")


def launch(case: Case, opts: LinearKernelOptions):
    """-> (tile, launch options) of ``case`` as the dispatch picks them. Float32 settings only where the
    options hold them, so this also runs against an earlier longscan (benchmarks/tuning/ptx_diff.py)."""
    per_key = case.gate == 3
    if case.dtype == torch.float32:
        cfg = opts.launch_config(case.name, per_key, float32=True)
    else:
        cfg = opts.launch_config(case.name, per_key)
    dim = case.V if case.name in ("fwd", "dv", "state") else case.K
    return min(dim, cfg.block), cfg.launch()


def constants(case: Case, opts: LinearKernelOptions = LinearKernelOptions()) -> tuple[dict, dict]:
    """-> (constexpr arguments, launch options) of ``case`` as the dispatch sets them (opts: the kernels'
    options, the defaults unless given)."""
    name, gate = case.name, case.gate
    block, cfg = launch(case, opts)
    args = KERNELS[name].arg_names
    # the reset switch where the kernel has one (an earlier longscan's may not: ptx_diff.py); without resets
    # the pre-pass's chunk marks are None, which the dispatch passes and Triton takes as a constexpr
    switch = dict(RESETS=case.resets) if "RESETS" in args else {}
    if "steep_chunks" in args and not case.resets:
        switch["steep_chunks"] = None
    need_dg = gate >= 2 if case.need_dg is None else bool(case.need_dg and gate)
    prec = opts.float32_products if case.dtype == torch.float32 else "tf32"
    if name.startswith("ops"):
        if "SUFFIX" in args:   # the decay factors' reverse scan, float32 only (an earlier longscan has none)
            switch["SUFFIX"] = case.dtype == torch.float32
        return dict(K=case.K, BK=block, C=opts.chunk_for(True), HAS_Q=True, STORE_KD=True,
                    STORE_F=name == "ops_b", **switch), cfg
    c = dict(K=case.K, V=case.V, C=opts.chunk_for(gate == 3), GATE=gate, PREC=prec, **switch)
    if name == "fwd":
        c.update(BV=block, HAS_H0=case.states, STORE_HT=case.states)
    elif name == "state":
        c.update(BV=block, FROM_START=case.from_start)
    elif name == "dv":
        c.update(BV=block, HAS_DHE=case.states)
    else:
        mode = plan._state_products(name, gate, case.dtype, need_dg, opts)
        c.update(BK=block, NEED_DG=need_dg, SF32=mode, SPREC="tf32" if mode == 1 else prec)
        c.update(dict(HAS_H0=case.states, STORE_ST=case.states and need_dg) if name == "dq" else
                 dict(HAS_DHE=case.states, HAS_TERM=case.states and need_dg))
        if "SPLIT" in args:   # the dq kernel's split scores (an earlier longscan's has no switch: ptx_diff.py)
            c["SPLIT"] = plan._split_scores(gate, case.dtype, need_dg, opts)
    return c, cfg


def compile_case(case: Case, arch: int = 90, opts: LinearKernelOptions = LinearKernelOptions()):
    """Compile ``case`` for compute capability ``arch`` (x10) -> Triton's compiled kernel (its .asm, .metadata)."""
    fn = KERNELS[case.name]
    consts, cfg = constants(case, opts)
    f32 = set(F32_ARGS[case.name]) | ({"g"} if case.gate >= 2 else set())
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in ("T", "H", "SEG", "NC", "NS"):
            sig[a] = "i32"
        elif a == "scale":
            sig[a] = "fp32"
        else:
            sig[a] = "*fp32" if a in f32 else _PTR[case.dtype]
    # what the launcher's specialisation gives at the benchmark shapes: pointers and sizes divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a] == "i32" or
             sig[a].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg)


def ptxas_report(kernel, arch: int = 90) -> dict:
    """A compiled Triton kernel -> what ptxas reports for it at compute capability ``arch`` (x10):
    {"registers", "spill_stores", "spill_loads", "shared"} (bytes for the last three)."""
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
        raise RuntimeError(f"could not read ptxas's report for {kernel.name}:\n{log}")
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)), shared=kernel.metadata.shared)


def resources(case: Case, arch: int, opts: LinearKernelOptions = LinearKernelOptions()) -> dict:
    """Compile one kernel -> ptxas_report of it."""
    return ptxas_report(compile_case(case, arch, opts), arch)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="g_gamma,g,gk", help=f"decay kinds, of {sorted(KINDS)}")
    ap.add_argument("--kernels", default="fwd,dq,dk,dv", help=f"of {sorted(KERNELS)} (the pre-pass: gk only)")
    ap.add_argument("--dtype", default="bf16", help=f"the inputs' dtype, of {sorted(DTYPES)}")
    ap.add_argument("--dims", type=int, default=D, help="head dims K = V (16, 32, 64 or 128)")
    ap.add_argument("--states", action="store_true", help="with an initial state, a final state and its gradient")
    ap.add_argument("--resets", action="store_true",
                    help="the gated kinds as packed documents compile them (log gates of -inf: options.resets)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    ap.add_argument("--float32-products", choices=("ieee", "tf32x3"), default="ieee",
                    help="LinearKernelOptions.float32_products (with --dtype fp32)")
    args = ap.parse_args()
    if plan._interpreting():
        raise SystemExit("kernel_resources.py compiles the kernels: unset TRITON_INTERPRET")
    kinds, names = args.kinds.split(","), args.kernels.split(",")
    for flag, values, known in (("--kinds", kinds, KINDS), ("--kernels", names, KERNELS),
                                ("--dtype", [args.dtype], DTYPES)):
        for x in values:
            if x not in known:   # before any compiling
                raise SystemExit(f"{flag}: unknown {flag[2:].rstrip('s')} {x!r}, expected one of {sorted(known)}")
    if args.dims not in plan._DIMS:
        raise SystemExit(f"--dims: expected one of {plan._DIMS}, got {args.dims}")
    opts = LinearKernelOptions(float32_products=args.float32_products)
    print(f"# triton {triton.__version__}, sm_{args.arch}, {args.dtype}, head dims {args.dims}"
          f"{', resets' if args.resets else ''}"
          f"{f', float32 products {args.float32_products}' if args.dtype == 'fp32' else ''}")
    for kind in kinds:
        for name in names:
            if name.startswith("ops") and kind != "gk":
                continue
            for from_start in ((False, True) if name == "state" else (False,)):   # (k, v) and (q, do) passes
                case = Case(name, KINDS[kind], DTYPES[args.dtype], args.dims, args.dims, states=args.states,
                            resets=args.resets and KINDS[kind] >= 2, from_start=from_start)
                r = resources(case, args.arch, opts)
                label = "state_q" if from_start else name
                print(f"{kind:8s} {label:7s} registers {r['registers']:3d}  spills {r['spill_stores']:4d} / "
                      f"{r['spill_loads']:4d} bytes (stores / loads)  shared {r['shared']:6d} bytes", flush=True)


if __name__ == "__main__":
    main()
