"""The delta-rule model variants: one training step with SP over 2 ranks (both layouts, each SP method) and
with TP over 2 ranks gives the loss, gradients and parameters of the unsplit step (float32, rel L2 ≤ 1e-5),
so the short convolution's halo exchange and its backward are exact."""
from __future__ import annotations

import os
import sys

import pytest

from harness import rel_err, run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "training"))
from training_common import assemble, local_tensors, tiny  # noqa: E402

TOL = 1e-5
VARIANTS = ("deltanet", "gated_deltanet", "kda")
CASES = {   # name -> (variant, parallel overrides[, schedule overrides]), all on 2 ranks
    "deltanet_sp2_zeco_zigzag": ("deltanet", {"sp": 2, "linear_method": "zeco", "layout": "zigzag"}),
    "gated_deltanet_sp2_lasp2_contiguous": ("gated_deltanet", {"sp": 2, "linear_method": "lasp2",
                                                               "layout": "contiguous"}),
    "kda_sp2_lasp1_zigzag": ("kda", {"sp": 2, "linear_method": "lasp1", "layout": "zigzag"}),
    # parallel.delta_transition = relay: each rank's state pass from the carry instead of its K×K transition
    "gated_deltanet_sp2_zeco_relay_zigzag": ("gated_deltanet", {"sp": 2, "linear_method": "zeco", "layout": "zigzag",
                                                                "delta_transition": "relay"}),
    "gated_deltanet_tp2": ("gated_deltanet", {"tp": 2}),
    # activation checkpointing recomputes the halo exchange in the backward (on every rank alike)
    "kda_sp2_zeco_zigzag_checkpointed": ("kda", {"sp": 2, "linear_method": "zeco", "layout": "zigzag"},
                                         {"activation_checkpointing": True}),
}


def config(variant, parallel=None, schedule=None):
    # two delta-rule layers (no softmax layer needed to test them)
    return tiny(model={"linear_variant": variant, "pattern": "L", "n_layers": 2}, parallel=parallel or {},
                schedule=schedule or {})


def _one_step(cfg):
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, cfg))
    m = t.train_step()
    return {"loss": m["loss"], **local_tensors(t)}


def _refs(rank, world):
    return {v: _one_step(config(v)) for v in VARIANTS}


def _cases(rank, world):
    return {n: _one_step(config(*c)) for n, c in CASES.items()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_refs, 1)[0], run_distributed(_cases, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_split_step_matches_unsplit(results, case):
    refs, per_rank = results
    ref = refs[CASES[case][0]]
    ranks = [r[case] for r in per_rank]
    for r in ranks:
        assert abs(r["loss"] - ref["loss"]) <= TOL * abs(ref["loss"]), (r["loss"], ref["loss"])
    params, grads = assemble(ranks)
    ref_params, ref_grads = assemble([ref])
    assert params.keys() == ref_params.keys()
    for name in ref_params:
        assert rel_err(grads[name], ref_grads[name]) <= TOL, (name, rel_err(grads[name], ref_grads[name]))
        assert rel_err(params[name], ref_params[name]) <= TOL, name


def test_the_step_is_not_vacuous(results):
    """The convolutions and β projections get gradients and the variants differ."""
    refs, _ = results
    for v in VARIANTS:
        _, grads = assemble([refs[v]])
        conv = [n for n in grads if n.endswith("_conv.weight")]
        assert len(conv) == 3 * 2 and all(grads[n].abs().sum() > 0 for n in conv + [n for n in grads if "b_proj" in n])
    assert len({refs[v]["loss"] for v in VARIANTS}) == 3
