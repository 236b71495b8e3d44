"""The delta rule's intra-chunk Triton kernels (forward and backward, scalar-gate and per-key variants)
compiled for sm_90a at the default options (K = V = 128, bf16 q, k, v; no GPU needed): ptxas reports no
register spills, at both input precisions. A spill is local-memory traffic on every chunk, which made the
tf32 backward slower than the float32 one. (The recurrence's kernels still spill at K = 128:
docs/delta_rule.md.)"""
import pytest

from harness import TRITON_DIRS, assert_compiled_without_spills

pytest.importorskip("triton")

_COMPILE = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks.tuning.kernel_resources import ptxas_report
from longscan.kernels.delta_rule.triton import DeltaTritonOptions, intra_bwd, intra_fwd
from longscan.kernels.delta_rule.triton.inter import pow2

o = DeltaTritonOptions()
K = V = 128
INPUTS = dict(Q="*bf16", K_="*bf16", V_="*bf16")


def counts(fn, consts):
    sig = {a: "constexpr" if a in consts else "i32" if a in ("T", "H", "N", "C", "K", "V") else "fp32"
           if a == "scale" else INPUTS.get(a, "*fp32") for a in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=o.num_warps, num_stages=o.intra_num_stages))
    r = ptxas_report(k)
    return dict(regs=r["registers"], spills=r["spill_stores"] + r["spill_loads"])

BC, BV, BK = pow2(o.chunk), min(o.block_v, V), min(o.block_k, K)
BLOCKED = o.inverse == "blocks"
KERNELS = (   # the scalar-gate kernels cover the ungated ones (GATE=0 is a subset of their code)
    ("intra_fwd", intra_fwd._intra_fwd, dict(HAS_Q=True, GATE=1, BC=BC, BK=BK, BV=BV, BLOCKED=BLOCKED)),
    ("intra_fwd_per_key", intra_fwd._intra_fwd_per_key, dict(HAS_Q=True, BC=BC, BKS=o.block_k, BV=BV,
                                                            BLOCKED=BLOCKED)),
    ("intra_bwd", intra_bwd._intra_bwd, dict(HAS_Q=True, GATE=1, BC=BC, BK=BK, BV=BV)),
    ("intra_bwd_per_key", intra_bwd._intra_bwd_per_key, dict(HAS_Q=True, BC=BC, BKS=o.block_k, BV=BV)),
)
out = {f"{name} {prec}": counts(fn, dict(consts, PREC=prec)) for name, fn, consts in KERNELS
       for prec in ("ieee", "tf32")}
print(json.dumps(out))
'''


@pytest.mark.parametrize("triton_dir", TRITON_DIRS)
def test_default_kernels_compile_for_hopper_without_spills(triton_dir):
    assert_compiled_without_spills(_COMPILE, kernels=8, first_on_path=triton_dir)
