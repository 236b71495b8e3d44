"""The delta rule's Triton kernels compiled for sm_90 without a GPU, as the dispatch launches them at the default
``DeltaTritonOptions`` (benchmarks/tuning/ptx_diff.py --family delta compares their PTX between two checkouts).

Every kernel of both paths: path="float32" (intra forward, the recurrence forward and its two backward kernels,
the blocked variants of the recurrence at inter_block_k = 32, the intra backward) and path="wy" (A, its inverse,
W and U, the state forward, the output, dv_local, the state backward, dq/dk/dW, the WY backward), for the three
kinds: deltanet (no gate), gated (a scalar gate g `[B, T, H]`) and kda (per-key gates g `[B, T, H, K]`), with
q (the outputs). The pointers the dispatch passes in the inputs' dtype (q, k, v; on "wy" the chunk quantities
it keeps and the gradients of q, k, v) take --dtype; β, g, the states and the float32 chunk quantities float32
(as the models pass them); the pointers the dispatch passes as None are None here too. ``states``: with an
entering state (forward) or a leaving state's gradient (backward), for the kernels whose code depends on it.

Run as a script it prints what a gate adds to each path="wy" kernel: registers, spills and shared memory (ptxas
-v at sm_90a), the programs an SM holds by those (H100: 64K registers, 227 KB of shared memory), and the PTX and
SASS instruction counts (static; SASS by class: tensor-core products, exps, shuffles, barriers, loads and
stores), one row a kind. Compile with the GPU's Triton (3.6 on the H100s of docs/benchmarks.md) first on the
path; --set NAME=VALUE compiles at other DeltaTritonOptions:

    PYTHONPATH=/path/to/triton-3.6:. python benchmarks/tuning/delta_compile.py [--kinds deltanet,gated]
        [--kernels wy_dqkw,wy_bwd] [--states] [--set wy_gate_rows=True]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from longscan.kernels.delta_rule.triton import DeltaTritonOptions, inter, intra_bwd, intra_fwd

KINDS = ("deltanet", "gated", "kda")
FLOAT32_KERNELS = ("intra_fwd", "inter_fwd", "inter_fwd_blocks", "inter_bwd", "inter_bwd_states",
                   "inter_bwd_states_blocks", "intra_bwd")
WY_KERNELS = ("wy_kkt", "wy_inverse", "wy_w_u", "wy_state_fwd", "wy_output", "wy_dv_local", "wy_state_bwd",
              "wy_dqkw", "wy_bwd")
KERNELS = FLOAT32_KERNELS + WY_KERNELS
# the kernels that take an entering state (HAS_H0) or a leaving state's gradient (HAS_DHT)
WITH_STATES = ("inter_fwd", "inter_fwd_blocks", "inter_bwd", "inter_bwd_states", "inter_bwd_states_blocks",
               "wy_state_fwd", "wy_state_bwd")
BLOCK_K = 32   # inter_block_k of the blocked recurrence kernels (the dispatch runs them when it is set)
# pointers in the inputs' dtype on path="float32" (its chunk quantities are float32)
FLOAT32_PATH_INPUTS = ("Q", "K_", "V_")
# float32 pointers on path="wy" (every other pointer is in the inputs' dtype)
WY_F32 = ("BETA", "G", "A_", "GB", "GC", "H0", "HT", "DHT", "DH0", "DB", "DBETA", "DG")
# the serial kernels' state strides (si_*: entering, so_*: leaving) as well
STRIDES = ("si_bh", "si_k", "si_v", "so_bh", "so_k", "so_v")
INTS = ("T", "H", "N", "C", "K", "V", "V0", "VB", "NDB") + STRIDES
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _none_args(kind: str, name: str, states: bool) -> set:
    """The pointers the dispatch passes as None for ``kind`` (with q)."""
    none = set()
    if kind == "deltanet":
        none |= {"G", "GB", "LAST", "DLAST", "DB", "DG"}
    if kind != "kda":
        none |= {"KB", "QG", "GC", "QK"} if name.startswith("wy") else set()
    if not states:
        none |= {"H0", "DHT"}
    return none


def _float32_launch(kind: str, name: str, states: bool, K: int, V: int, o: DeltaTritonOptions):
    """-> (kernel, constexprs, num_warps, num_stages) of a path="float32" kernel."""
    per_key = kind == "kda"
    BC, BV = inter.pow2(o.chunk), min(o.block_v, inter.pow2(V))
    prec, blocked = o.input_precision, o.inverse == "blocks"
    gate = {"deltanet": 0, "gated": 1, "kda": 2}[kind]
    intra = dict(HAS_Q=True, BC=BC, BV=BV, PREC=prec)
    if per_key:
        intra["BKS"] = o.block_k
    else:
        intra.update(GATE=int(gate > 0), BK=min(o.block_k, inter.pow2(K)))
    rec = dict(HAS_Q=True, GATE=gate, BC=BC, BK=inter.pow2(K), BV=BV, PREC=prec)
    blocks = dict(KS=inter._key_step(BLOCK_K, K)) if name.endswith("_blocks") else {}
    if name == "intra_fwd":
        fn = intra_fwd._intra_fwd_per_key if per_key else intra_fwd._intra_fwd
        return fn, dict(intra, BLOCKED=blocked), o.num_warps, o.intra_num_stages
    if name == "intra_bwd":
        fn = intra_bwd._intra_bwd_per_key if per_key else intra_bwd._intra_bwd
        return fn, intra, o.num_warps, o.intra_num_stages
    fn = {"inter_fwd": inter._inter_fwd, "inter_fwd_blocks": inter._inter_fwd_blocks, "inter_bwd": inter._inter_bwd,
          "inter_bwd_states": inter._inter_bwd_states,
          "inter_bwd_states_blocks": inter._inter_bwd_states_blocks}[name]
    switch = dict(HAS_H0=states) if name.startswith("inter_fwd") else dict(HAS_DHT=states)
    return fn, dict(rec, **switch, **blocks), o.num_warps, o.inter_num_stages


def _wy_launch(kind: str, name: str, states: bool, K: int, V: int, o: DeltaTritonOptions):
    """-> (kernel, constexprs, num_warps, num_stages or None: Triton's default) of a path="wy" kernel."""
    from longscan.kernels.delta_rule.triton import wy, wy_grads, wy_output, wy_prep, wy_state
    from longscan.kernels.delta_rule.triton.wy_decay import NO_GATE, PER_KEY, SCALAR
    gate = {"deltanet": NO_GATE, "gated": SCALAR, "kda": PER_KEY}[kind].value
    o = o.resolved(torch.bfloat16) if o.path == "auto" else o if o.path == "wy" else DeltaTritonOptions(path="wy")
    bk = wy.parallel_block_k(K, gate)
    BV = min(o.block_v, max(16, triton.next_power_of_2(V)))
    par = dict(GATE=gate, BK=bk, BV=BV, PREC=o.input_precision)
    # the forward's W/U and output at wy_forward_block_v (an earlier longscan's options may have no such field)
    fwd_v = (o.wy_forward_block_v if "wy_forward_block_v" in {f.name for f in dataclasses.fields(o)} else None)
    fwd = dict(par, BV=min(fwd_v, max(16, triton.next_power_of_2(V)))) if fwd_v is not None else par
    # the serial kernels' width as launched for many sequences × heads (16 × 16 at 16×4096) on a 132-SM GPU
    sv = (min(o.wy_state_block_v, max(16, triton.next_power_of_2(V))) if o.wy_state_block_v is not None else
          wy_state.serial_block_v(None, V, 256, gate, 132))
    serial = dict(GATE=gate, KP=wy_state._kp(K), BV=sv, PREC=o.input_precision)
    # contiguous states (the plain pass): Triton specializes their column strides, 1, as constants at launch
    if "si_v" in wy_state._wy_state_fwd.arg_names:
        serial.update(si_v=1, so_v=1)
    # (an earlier longscan may choose no warps by the width: its options then hold them)
    sw = (wy_state.serial_num_warps(o.wy_state_num_warps, sv) if hasattr(wy_state, "serial_num_warps") else
          o.wy_state_num_warps)
    ss = o.inter_num_stages
    # (nor a choice of dA's form in the WY backward)
    da = (dict(DA_INPUTS=o.wy_bwd_from_inputs and gate != PER_KEY.value)
          if "DA_INPUTS" in wy_grads._wy_bwd.arg_names else {})
    # (an earlier longscan kept the inverse's warps in a module constant)
    inverse_warps = (o.wy_inverse_num_warps if "wy_inverse_num_warps" in {f.name for f in dataclasses.fields(o)}
                     else wy_prep.INVERSE_WARPS)
    # (an earlier longscan, compiled by ptx_diff.py, may have no GATE_ROWS switch)
    rows = dict(GATE_ROWS=o.wy_gate_rows) if "GATE_ROWS" in wy_state._wy_state_bwd.arg_names else {}
    # (nor a WRITE_QK switch: per-key gates' decayed scores formed for the output)
    qk = dict(WRITE_QK=gate == PER_KEY.value) if "WRITE_QK" in wy_prep._wy_kkt.arg_names else {}
    return {
        "wy_kkt": (wy_prep._wy_kkt, dict(GATE=gate, BK=bk, PREC=o.input_precision, **qk), o.num_warps, None),
        "wy_inverse": (wy_prep._wy_inverse, {}, inverse_warps, None),
        "wy_w_u": (wy_prep._wy_w_u, dict(fwd, HAS_Q=True), o.num_warps, None),
        "wy_state_fwd": (wy_state._wy_state_fwd, dict(serial, HAS_H0=states), sw, ss),
        "wy_output": (wy_output._wy_output, fwd, o.num_warps, None),
        "wy_dv_local": (wy_grads._wy_dv_local, par, o.num_warps, None),
        "wy_state_bwd": (wy_state._wy_state_bwd, dict(serial, HAS_Q=True, HAS_DHT=states, **rows), sw, ss),
        "wy_dqkw": (wy_grads._wy_dqkw, dict(par, HAS_Q=True), o.num_warps, None),
        "wy_bwd": (wy_grads._wy_bwd, dict(par, BK=wy_grads.bwd_block_k(bk, gate), **da), o.num_warps, None),
    }[name]


def compile_kernel(kind: str, name: str, states: bool, dtype: torch.dtype, dims: int,
                   options: DeltaTritonOptions = DeltaTritonOptions()):
    """``name`` for ``kind`` at K = V = dims, inputs in ``dtype``, compiled for sm_90 at ``options`` -> Triton's
    compiled kernel."""
    if kind not in KINDS or name not in KERNELS:
        raise ValueError(f"compile_kernel: expected a kind of {KINDS} and a kernel of {KERNELS}, got {kind!r}, {name!r}")
    o = options
    wy_path = name.startswith("wy")
    launch = _wy_launch if wy_path else _float32_launch
    fn, consts, warps, stages = launch(kind, name, states, dims, dims, o)
    consts = dict(consts, **{a: None for a in _none_args(kind, name, states) if a in fn.arg_names})
    ptr = _PTR[dtype]
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in INTS:
            sig[a] = "i32"
        elif a == "scale":
            sig[a] = "fp32"
        elif wy_path:
            sig[a] = "*fp32" if a in WY_F32 else ptr
        else:
            sig[a] = ptr if a in FLOAT32_PATH_INPUTS else "*fp32"
    # pointers are 16-byte aligned and the head dims (and the float32 path's chunk) multiples of 16, as launched;
    # the state strides too (the relay's V-major carries; a contiguous state's column stride 1 compiles as a constant)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a not in consts and (sig[a].startswith("*") or a in ("K", "V", "C", "V0", "VB") + STRIDES)}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    options = dict(num_warps=warps) if stages is None else dict(num_warps=warps, num_stages=stages)
    # the register cap of the parallel backward kernels (an earlier longscan's options may have no such field)
    if name in ("wy_dqkw", "wy_bwd") and "wy_max_registers" in {f.name for f in dataclasses.fields(o)}:
        if o.wy_max_registers is not None:
            options["maxnreg"] = o.wy_max_registers
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


# SASS instruction classes shown (HGMMA: Hopper tensor-core products; MUFU: exps; SHFL and BAR: the cross-thread
# traffic of reductions and scans; LDGSTS: loads copied to shared memory asynchronously, LDG: to registers)
SASS_CLASSES = ("HGMMA", "MUFU", "SHFL", "BAR", "LDGSTS", "LDG", "STG", "LDS", "STS", "FMUL", "FFMA", "FADD")
SM_REGISTERS, SM_SHARED = 65536, 232448   # an H100 SM's registers and shared memory a block may use in all


def sass_counts(kernel) -> tuple[int, collections.Counter]:
    """A compiled kernel -> (its SASS instruction count, counts by opcode), disassembled by nvdisasm beside the
    ptxas that Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas
    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    ops = [re.sub(r"^@!?U?P\w+\s+", "", line.split("*/", 1)[1].strip()) for line in out.splitlines()
           if re.match(r"\s*/\*[0-9a-f]{4}\*/", line) and "*/" in line]
    ops = [op for op in ops if op]
    return len(ops), collections.Counter(op.split()[0].split(".")[0] for op in ops)


def ptx_count(kernel) -> int:
    """Instructions in a compiled kernel's PTX (no directives, labels, braces or comments)."""
    return sum(1 for line in kernel.asm["ptx"].splitlines()
               if line.strip() and not line.strip().startswith((".", "//", "$", "{", "}")))


def programs_per_sm(registers: int, shared: int, warps: int) -> int:
    """Programs an SM holds by registers (allocated 8 a thread at a time) and shared memory."""
    by_regs = SM_REGISTERS // (((registers + 7) // 8 * 8) * 32 * warps)
    by_shared = SM_SHARED // shared if shared else 32
    return min(by_regs, by_shared)


def set_items(items: list[str]) -> dict:
    """--set NAME=VALUE items (DeltaTritonOptions fields) -> keyword arguments (True/False/None, ints, strings)."""
    kw = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--set: expected NAME=VALUE (a DeltaTritonOptions field), got {item!r}")
        kw[name] = {"True": True, "False": False, "None": None}.get(value, int(value) if value.isdigit() else value)
    return kw


def _parse_set(items: list[str]) -> DeltaTritonOptions:
    try:
        return DeltaTritonOptions(**set_items(items))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--set: {e}") from None


def main():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernel_resources import ptxas_report
    ap = argparse.ArgumentParser(description="what a gate adds to each path='wy' kernel, compiled for sm_90a")
    ap.add_argument("--kinds", default="deltanet,gated", help=f"of {KINDS}")
    ap.add_argument("--kernels", default=",".join(n for n in WY_KERNELS if n != "wy_inverse"),
                    help=f"of {WY_KERNELS}")
    ap.add_argument("--dims", type=int, default=128, help="head dims K = V")
    ap.add_argument("--states", action="store_true", help="with an entering state / a leaving state's gradient")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="DeltaTritonOptions fields")
    args = ap.parse_args()
    kinds, names = args.kinds.split(","), args.kernels.split(",")
    for flag, values, known in (("--kinds", kinds, KINDS), ("--kernels", names, WY_KERNELS)):
        for x in values:
            if x not in known:
                raise SystemExit(f"{flag}: unknown {flag[2:-1]} {x!r}, expected one of {known}")
    options = _parse_set(args.set)
    print(f"# triton {triton.__version__}, sm_90a, bf16, K = V = {args.dims}, {options}")
    print(f"{'kernel':14} {'kind':9} {'regs':>4} {'spill':>5} {'shared':>7} {'SM':>3} {'PTX':>5} {'SASS':>5} "
          + " ".join(f"{c:>6}" for c in SASS_CLASSES))
    for name in names:
        for kind in kinds:
            kernel = compile_kernel(kind, name, args.states and name in WITH_STATES, torch.bfloat16, args.dims, options)
            r = ptxas_report(kernel)
            n, ops = sass_counts(kernel)
            warps = kernel.metadata.num_warps
            print(f"{name:14} {kind:9} {r['registers']:4d} {r['spill_stores'] + r['spill_loads']:5d} "
                  f"{r['shared']:7d} {programs_per_sm(r['registers'], r['shared'], warps):3d} {ptx_count(kernel):5d} "
                  f"{n:5d} " + " ".join(f"{ops.get(c, 0):6d}" for c in SASS_CLASSES), flush=True)


if __name__ == "__main__":
    main()
