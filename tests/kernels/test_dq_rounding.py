"""dq's bf16 roundings: benchmarks/tuning/dq_rounding.py's emulation of the Triton kernels' dq (float64 with their
bf16 roundings made explicit) against fla-core's rounding pattern and the float32 bar, and the changed dq kernels
compiled for sm_90a at head dims 128 (no GPU needed) without spills."""
import os
import statistics
import sys

import pytest

from harness import ROOT, TRITON_DIRS, assert_compiled_without_spills

sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tuning"))
import dq_rounding as dr  # noqa: E402


def _errors(kind, variants, T, seeds, K=64, states=False):
    """{variant: [dq error / peer's error]} over fresh inputs (peer: fla's pattern per key, else the bar)."""
    out = {name: [] for name in variants}
    for seed in range(seeds):
        raw = dr.draw(T, K, K, states, kind == "gk", seed, gamma=kind == "g_gamma")
        x = raw.rounded()
        ref = dr.exact_dq(raw)
        peer = dr.rel(dr.fla_gla_dq(x) if kind == "gk" else dr.bar_dq(x), ref)
        for name, v in variants.items():
            out[name].append(dr.rel(v.dq(x), ref) / peer)
    return out


def test_emulated_per_key_dq_within_one_and_a_half_of_fla():
    """Per key with the gate gradient: level 0's keys in float32 (the shipped kernel) bring dq's median error
    within 1.5× fla's pattern at T = 65, where the bf16 keys left it about at 1.5×; rounding kn and e0 again
    puts it back above the shipped one on every seed."""
    r = _errors("gk", {"before": dr.PerKey(), "shipped": dr.PerKey(e0=False, kn=False)}, 65, 6)
    assert statistics.median(r["shipped"]) <= 1.4, r
    assert all(s < b for s, b in zip(r["shipped"], r["before"])), r


def test_emulated_constant_decay_split_scores_meet_the_bar():
    """The constant decay without dg (the bf16 kernels): the scores as two bf16 halves leave dq at the bar (the
    float32 computation rounded once), where rounding them once costs ~12% at T = 65 and more at T = 1."""
    for T in (1, 65):
        r = _errors("g_gamma", {"once": dr.Scalar(), "split": dr.Scalar(dA_split=True)}, T, 6)
        assert statistics.median(r["split"]) <= 1.05, (T, r)
        assert statistics.median(r["once"]) > 1.05, (T, r)


def test_tf32_rounding_keeps_ten_mantissa_bits():
    import torch
    x = torch.tensor([1 + 2 ** -10, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -12)], dtype=torch.float64)
    assert dr.tf32(x).tolist() == [1 + 2 ** -10, 1.0, 1 + 2 ** -9, -1.0]


_COMPILE = r'''
import json
from benchmarks.tuning.kernel_resources import Case, resources
cases = {"g_gamma dq states": Case("dq", 1, states=True), "g dq no dg": Case("dq", 2, need_dg=False),
         "gk dq": Case("dq", 3)}
out = {}
for name, case in cases.items():
    r = resources(case, 90)
    out[name] = {"regs": r["registers"], "spills": r["spill_stores"] + r["spill_loads"]}
print(json.dumps(out))
'''


@pytest.mark.parametrize("triton_dir", TRITON_DIRS)
def test_changed_dq_kernels_compile_for_hopper_without_spills(triton_dir):
    """The dq kernels this accuracy work changed, as the dispatch launches them at bf16, head dims 128: the
    constant decay's (split scores, with states), the scalar gate's without dg (split scores) and the per-key
    one with dg (level 0's keys in float32)."""
    assert_compiled_without_spills(_COMPILE, kernels=3, first_on_path=triton_dir)
