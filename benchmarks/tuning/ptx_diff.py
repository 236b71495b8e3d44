"""Did a change alter the compiled code of the Triton linear-attention kernels? Compiles them for a CUDA target
without a GPU, at this checkout and at an earlier one, and compares their PTX with the debug lines (.loc, .file,
the debug sections), label names and bare label lines stripped: a kernel whose PTX is the same runs as fast as
before, so a change that leaves it alone needs no GPU timing. (A bare label, `$L__tmp3:`, marks a debug range,
such as an inlined helper's; branches name their targets in the instructions, which are compared.)

Compiles the forward, state, dq, dk and dv kernels (and for per-key gates the pre-pass and the levels kernel
that adds the terms of steep chunks, after the forward (lv0), the dq kernel (lv1, with the gate gradient) and the
dk and dv kernels (lv2)) with the launch settings and state-product modes the dispatch picks
(benchmarks/tuning/kernel_resources.py: gates with their gradient, the constant decay without), for each decay
kind, in bf16 (or --dtype fp16) at head dims --dims.

    PYTHONPATH=. python benchmarks/tuning/ptx_diff.py --base HEAD~1 [--kinds none,g_gamma,g,gk] [--kernels fwd,dq]
        [--states] [--resets]

--base takes a git revision of this repository or a directory holding an unpacked earlier longscan/. Prints one
line a kernel ("same" or "CHANGED" with the number of differing lines) and exits 1 when any changed.
--resets compiles the gated kinds (g, gk) of this checkout as the dispatch does for log gates that may hold −inf
(LinearKernelOptions.resets; the base's kernels get it too where they have the switch, and are compiled as they
are where they have none).

--family delta compares the delta rule's kernels instead (benchmarks/tuning/delta_compile.py: every kernel of
path="float32" and path="wy" for the kinds deltanet, gated and kda at the default DeltaTritonOptions; --states
adds the kernels that take an entering state or a leaving state's gradient with it):

    PYTHONPATH=. python benchmarks/tuning/ptx_diff.py --family delta --base HEAD~1 --states [--kinds kda]
        [--kernels wy_bwd,intra_fwd]
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KINDS = ("none", "g_gamma", "g", "gk")
KERNELS = ("fwd", "state", "dq", "dk", "dv", "ops", "ops_b", "lv0", "lv1", "lv2")
# the per-key kernels (the pre-pass and the levels kernel's three modes)
PER_KEY = ("ops", "ops_b", "lv0", "lv1", "lv2")
DTYPES = ("bf16", "fp16")
FAMILIES = ("linear", "delta")


def normalise(ptx: str) -> list[str]:
    """PTX lines without debug information or label names (which shift with any line of source above them)."""
    cut = re.search(r"^\s*\.section\s+\.debug", ptx, flags=re.M)
    if cut:
        ptx = ptx[:cut.start()]
    out = []
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.startswith((".loc", ".file", "//")):
            continue
        if re.fullmatch(r"\$L\w*:", s):
            continue
        out.append(re.sub(r"\$L__\w+", "$L", s))
    return out


def cases(kinds: list[str], kernels: list[str], states: bool, family: str = "linear") -> list[tuple[str, str, bool]]:
    """(kind, kernel, with states) to compile; the pre-pass for per-key gates only, states where a kernel takes them."""
    out = []
    for kind in kinds:
        for name in kernels:
            if family == "delta":
                out.append((kind, name, False))
                if states and name in _delta().WITH_STATES:
                    out.append((kind, name, True))
                continue
            if name in PER_KEY and kind != "gk":
                continue
            out.append((kind, name, False))
            if states and name not in ("state",) + PER_KEY:
                out.append((kind, name, True))
    return out


def _delta():
    """The delta rule's compile helper beside this file, imported only for --family delta (it imports the
    delta-rule kernels of the tree on the path, which an earlier longscan may lack)."""
    sys.path.insert(0, HERE)
    import delta_compile
    return delta_compile


def dump(tree: str, todo: list, dtype: str, dims: int, resets: bool, outdir: str, family: str = "linear") -> None:
    """Compile every case against the longscan package under ``tree`` (this file's helpers, that tree's
    kernels) in a subprocess, writing <kind>-<kernel>[-states].ptx under outdir."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = tree
    args = [sys.executable, os.path.abspath(__file__), "--compile-into", outdir, "--dtype", dtype,
            "--dims", str(dims), "--cases", json.dumps(todo), "--family", family] + (["--resets"] if resets else [])
    out = subprocess.run(args, env=env, cwd=outdir, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"compiling against {tree} failed:\n{out.stderr[-4000:]}")


def compile_levels(mode: int, dtype, dims: int, resets: bool):
    """The levels kernel (levels.py) in MODE ``mode`` as _add_levels launches it (the gate gradient in mode 1),
    compiled for sm_90 -> Triton's compiled kernel. g (the per-key gates) and gq in float32, the marks int32."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from longscan.kernels.linear_attention import LinearKernelOptions
    from longscan.kernels.linear_attention.triton import levels
    fn = levels._levels_kernel
    consts = dict(K=dims, V=dims, C=LinearKernelOptions().chunk_for(True), MODE=mode, NEED_DG=mode == 1,
                  PREC="tf32")
    if "RESETS" in fn.arg_names:   # (an earlier longscan's may have no switch)
        consts["RESETS"] = resets
    if "steep_chunks" in fn.arg_names and not resets:
        consts["steep_chunks"] = None   # what the dispatch passes without resets, a constexpr
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in ("T", "H", "SEG"):
            sig[a] = "i32"
        elif a == "scale":
            sig[a] = "fp32"
        else:
            sig[a] = {"g": "*fp32", "gq": "*fp32", "steep": "*i32", "steep_chunks": "*i32"}.get(a, ptr)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a] == "i32" or sig[a].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))


def compile_into(outdir: str, todo: list, dtype: str, dims: int, resets: bool, family: str = "linear") -> None:
    """In the subprocess: the longscan on PYTHONPATH is the tree compared (this script's folder gives the helpers).
    resets: the gated kinds compiled to take −inf (as the dispatch does only for them)."""
    sys.path.insert(0, HERE)
    if family == "delta":
        import torch
        for kind, name, states in todo:
            kernel = _delta().compile_kernel(kind, name, states, {"bf16": torch.bfloat16,
                                                                       "fp16": torch.float16}[dtype], dims)
            with open(os.path.join(outdir, f"{kind}-{name}{'-states' if states else ''}.ptx"), "w") as f:
                f.write(kernel.asm["ptx"])
        return
    import kernel_resources as kr   # noqa: E402 (after the path: the helper beside this file)
    for kind, name, states in todo:
        gated = resets and kind in ("g", "gk")
        if name.startswith("lv"):
            kernel = compile_levels(int(name[2]), kr.DTYPES[dtype], dims, gated)
        else:
            kernel = kr.compile_case(kr.Case(name, kr.KINDS[kind], kr.DTYPES[dtype], dims, dims, states=states,
                                             resets=gated))
        with open(os.path.join(outdir, f"{kind}-{name}{'-states' if states else ''}.ptx"), "w") as f:
            f.write(kernel.asm["ptx"])


def base_tree(base: str, into: str) -> str:
    """-> a directory holding the base's longscan/: ``base`` itself when it is one, else ``git archive`` of it."""
    if os.path.isdir(os.path.join(base, "longscan")):
        return os.path.abspath(base)
    arch = os.path.join(into, "base.tar")
    with open(arch, "wb") as f:
        r = subprocess.run(["git", "archive", base, "longscan"], cwd=ROOT, stdout=f, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise SystemExit(f"--base: {base!r} is neither a directory holding longscan/ nor a git revision "
                         f"({r.stderr.decode().strip()})")
    tree = os.path.join(into, "base")
    with tarfile.open(arch) as t:
        t.extractall(tree, filter="data")
    return tree


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="git revision or directory with an earlier longscan/")
    ap.add_argument("--family", default="linear", help=f"the kernels compared, of {FAMILIES}")
    ap.add_argument("--kinds", help=f"decay kinds, of {KINDS} (--family delta: deltanet, gated, kda); default: all")
    ap.add_argument("--kernels", help=f"of {KERNELS} (--family delta: benchmarks/tuning/delta_compile.py's "
                                      f"KERNELS); default: all")
    ap.add_argument("--dtype", default="bf16", help=f"the inputs' dtype, of {DTYPES}")
    ap.add_argument("--dims", type=int, default=128, help="head dims K = V")
    ap.add_argument("--states", action="store_true", help="also with entering and leaving states")
    ap.add_argument("--resets", action="store_true", help="the gated kinds as compiled for log gates of -inf")
    ap.add_argument("--compile-into", help=argparse.SUPPRESS)
    ap.add_argument("--cases", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_into:
        compile_into(args.compile_into, json.loads(args.cases), args.dtype, args.dims, args.resets, args.family)
        return
    if not args.base:
        raise SystemExit("--base: give the git revision or directory to compare against")
    if args.family not in FAMILIES:
        raise SystemExit(f"--family: expected one of {FAMILIES}, got {args.family!r}")
    delta = args.family == "delta"
    if delta and args.resets:
        raise SystemExit("--resets: the linear-attention kernels' switch; --family delta has none")
    all_kinds, all_kernels = (_delta().KINDS, _delta().KERNELS) if delta else (KINDS, KERNELS)
    kinds = args.kinds.split(",") if args.kinds else list(all_kinds)
    kernels = args.kernels.split(",") if args.kernels else list(all_kernels)
    for flag, values, known in (("--kinds", kinds, all_kinds), ("--kernels", kernels, all_kernels)):
        for x in values:
            if x not in known:
                raise SystemExit(f"{flag}: unknown {flag[2:-1]} {x!r}, expected one of {known}")
    if args.dtype not in DTYPES:
        raise SystemExit(f"--dtype: expected one of {DTYPES} (the earlier kernels' options may have no float32 "
                         f"settings), got {args.dtype!r}")
    if args.dims not in (16, 32, 64, 128):
        raise SystemExit(f"--dims: expected one of (16, 32, 64, 128), got {args.dims}")
    todo = cases(kinds, kernels, args.states, args.family)
    with tempfile.TemporaryDirectory() as d:
        trees = {"base": base_tree(args.base, d), "here": ROOT}
        for side, tree in trees.items():
            os.makedirs(os.path.join(d, f"ptx-{side}"))
            dump(tree, todo, args.dtype, args.dims, args.resets, os.path.join(d, f"ptx-{side}"), args.family)
        changed = 0
        print(f"# {args.family}, {args.dtype}, head dims {args.dims}, base {args.base}"
              f"{', resets' if args.resets else ''}")
        for kind, name, states in todo:
            fname = f"{kind}-{name}{'-states' if states else ''}.ptx"
            a, b = (normalise(open(os.path.join(d, f"ptx-{side}", fname)).read()) for side in ("base", "here"))
            diff = [x for x in difflib.unified_diff(a, b, lineterm="", n=0)
                    if x[:1] in "+-" and x[:3] not in ("+++", "---")]
            label = f"{kind:8s} {name:{23 if delta else 5}s}{' states' if states else '       '}"
            print(f"{label} {'same' if not diff else f'CHANGED ({len(diff)} lines)'}  ({len(b)} lines)", flush=True)
            changed += bool(diff)
    sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
