"""The memory estimator on the delta-rule variants: what a mixer stage saves per token, against the bytes
autograd saves with the Triton kernels (the interpreter on CPU: the kernels keep the same tensors as on a
GPU) under CPU bf16 autocast (path wy) and in float32 (path float32), TP 1 and 2; and the parameters a rank
holds."""
from __future__ import annotations

import dataclasses

import pytest

from harness import each_tp, run_distributed_interpreted, tp_model
from longscan.models.args import DELTA_VARIANTS, ModelConfig
from longscan.models.conv import CONV_KERNEL
from longscan.training.memory import Layout, saved_per_token, stage_params
from training_common import saved_by_stage

pytestmark = pytest.mark.interpreted   # its workers run the Triton kernels in the CPU interpreter

pytest.importorskip("triton")

T = 128   # two wy chunks of 64, four float32 chunks of 32: no padded chunk


def _cfg(variant):   # 4 heads of 16: 2 a rank at TP 2; one delta layer (block 0 is the one measured)
    return ModelConfig(dim=64, n_layers=4, pattern="LNNN", n_heads=4, n_kv_heads=2, linear_variant=variant,
                       vocab_size=100)


def _measure(rank, world):
    from longscan.models.model import SPSpec
    out = {}
    for tp in each_tp():
        # TP 1: the ranks would measure the same model; each takes its share of the variants
        for variant in DELTA_VARIANTS if tp > 1 else DELTA_VARIANTS[rank::world]:
            cfg = _cfg(variant)
            model = tp_model(cfg, SPSpec(linear_backend="triton"), tp)
            out[("params", tp, variant)] = sum(p.numel() for p in model.parameters())
            for bf16 in (False, True):
                out[("saved", tp, variant, bf16)] = saved_by_stage(model, cfg, bf16, T)["L"]
            for path, bf16 in (("float32", True), ("wy", False)) if tp == 1 else ():   # kernels.delta_path
                other = tp_model(cfg, SPSpec(linear_backend="triton", delta_path=path), 1, tp_rank=0)
                out[("saved", tp, variant, bf16, path)] = saved_by_stage(other, cfg, bf16, T)["L"]
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed_interpreted(_measure, 2)


def _values(measured, key) -> list:
    """key's value on every rank that measured it (at least one)."""
    got = [res[key] for res in measured if key in res]
    assert got, f"no rank measured {key}"
    return got


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", DELTA_VARIANTS)
def test_delta_parameter_count_matches_the_model(measured, tp, variant):
    for params in _values(measured, ("params", tp, variant)):
        assert stage_params(_cfg(variant), Layout(tp=tp)) == params


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", DELTA_VARIANTS)
def test_delta_mixer_saved_bytes_per_token_match_autograd(measured, tp, variant, bf16):
    """Exact, but for two constants a sequence the estimator leaves out: each short convolution's input is
    kept padded by (kernel - 1) tokens, and under autocast its weight's bf16 copy is kept too."""
    cfg = _cfg(variant)
    act, I = (2 if bf16 else 4), cfg.n_heads * cfg.hd // tp
    constants = 3 * (CONV_KERNEL - 1) * I * act + (3 * I * CONV_KERNEL * act if bf16 else 0)
    predicted = saved_per_token(cfg, "L", tp, act)
    for saved in _values(measured, ("saved", tp, variant, bf16)):
        assert predicted + constants / T == saved
    if tp == 1:   # the other path on these inputs (kernels.delta_path): float32 on bf16, wy on float32
        path = "float32" if bf16 else "wy"
        for saved in _values(measured, ("saved", tp, variant, bf16, path)):
            assert saved_per_token(cfg, "L", tp, act, delta_path=path) + constants / T == saved
    # the plain linear mixer's count, which the delta variants had before, is far below
    assert predicted > 2 * saved_per_token(dataclasses.replace(cfg, linear_variant="linear"), "L", tp, act)


def test_the_estimate_follows_kernels_delta_path():
    """`longscan train`'s estimate counts the path kernels.delta_path names: float32 on bf16 keeps its chunks'
    products in float32, more than wy's."""
    from longscan.training.config import load_config, validate
    from longscan.training.memory import estimate_config
    base = ["model.linear_variant=kda", "parallel.tp=1", "parallel.pp=1", "parallel.sp=1", "data.seq_len=4096"]
    peak = {path: estimate_config(validate(load_config(None, base + [f"kernels.delta_path={path}"]), 1), 1).peak
            for path in ("auto", "wy", "float32")}
    assert peak["auto"] == peak["wy"] < peak["float32"]
