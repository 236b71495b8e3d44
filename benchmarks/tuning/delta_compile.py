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
"""
from __future__ import annotations

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
WY_F32 = ("BETA", "G", "A_", "GC", "H0", "HT", "DHT", "DH0", "DB", "DBETA", "DG")
INTS = ("T", "H", "N", "C", "K", "V", "V0", "VB", "NDB")
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _none_args(kind: str, name: str, states: bool) -> set:
    """The pointers the dispatch passes as None for ``kind`` (with q)."""
    none = set()
    if kind == "deltanet":
        none |= {"G", "LAST", "DLAST", "DB", "DG"}
    if kind != "kda":
        none |= {"KB", "QG", "GC"} if name.startswith("wy") else set()
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
    o = o if o.path == "wy" else DeltaTritonOptions(path="wy")
    bk = wy.parallel_block_k(K, gate)
    BV = min(o.block_v, max(16, triton.next_power_of_2(V)))
    par = dict(GATE=gate, BK=bk, BV=BV, PREC=o.input_precision)
    serial = dict(GATE=gate, KP=wy_state._kp(K), BV=min(o.wy_state_block_v, max(16, triton.next_power_of_2(V))),
                  PREC=o.input_precision)
    sw, ss = o.wy_state_num_warps, o.inter_num_stages
    return {
        "wy_kkt": (wy_prep._wy_kkt, dict(GATE=gate, BK=bk, PREC=o.input_precision), o.num_warps, None),
        "wy_inverse": (wy_prep._wy_inverse, {}, wy_prep.INVERSE_WARPS, None),
        "wy_w_u": (wy_prep._wy_w_u, dict(par, HAS_Q=True), o.num_warps, None),
        "wy_state_fwd": (wy_state._wy_state_fwd, dict(serial, HAS_H0=states), sw, ss),
        "wy_output": (wy_output._wy_output, par, o.num_warps, None),
        "wy_dv_local": (wy_grads._wy_dv_local, par, o.num_warps, None),
        "wy_state_bwd": (wy_state._wy_state_bwd, dict(serial, HAS_Q=True, HAS_DHT=states), sw, ss),
        "wy_dqkw": (wy_grads._wy_dqkw, dict(par, HAS_Q=True), o.num_warps, None),
        "wy_bwd": (wy_grads._wy_bwd, dict(par, BK=wy_grads.bwd_block_k(bk, gate)), o.num_warps, None),
    }[name]


def compile_kernel(kind: str, name: str, states: bool, dtype: torch.dtype, dims: int):
    """``name`` for ``kind`` at K = V = dims, inputs in ``dtype``, compiled for sm_90 -> Triton's compiled kernel."""
    if kind not in KINDS or name not in KERNELS:
        raise ValueError(f"compile_kernel: expected a kind of {KINDS} and a kernel of {KERNELS}, got {kind!r}, {name!r}")
    o = DeltaTritonOptions()
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
    # pointers are 16-byte aligned and the head dims (and the float32 path's chunk) multiples of 16, as launched
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or a in ("K", "V", "C", "V0", "VB")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    options = dict(num_warps=warps) if stages is None else dict(num_warps=warps, num_stages=stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
