"""One optimizer step gives the same loss, gradients and parameters for every parallel split.

Float32, relative L2 error ≤ 1e-5 against (TP1, PP1, SP1) with the same model and global batch.
Three spawns: the single-process references, all two-process splits in one group, TP2×SP2 in four.
"""
from __future__ import annotations

import pytest

from harness import rel_err, run_distributed
from training_common import assemble, local_tensors, tiny

TOL = 1e-5

# name -> (world size, config overrides). SP cases pair each linear method with a softmax method and
# cover both layouts and every linear variant.
CASES = {
    "tp2": (2, tiny(parallel={"tp": 2}, model={"linear_variant": "gla"})),
    "sp2_zeco_ring_zigzag": (2, tiny(parallel={"sp": 2, "linear_method": "zeco", "softmax_method": "ring"})),
    "sp2_lasp2_allgather_contiguous": (2, tiny(parallel={"sp": 2, "linear_method": "lasp2",
                                                         "softmax_method": "allgather", "layout": "contiguous"},
                                               model={"linear_variant": "gla"})),
    "sp2_lasp1_ulysses_zigzag": (2, tiny(parallel={"sp": 2, "linear_method": "lasp1", "softmax_method": "ulysses"},
                                         model={"linear_variant": "simple_gla"})),
    "sp2_lasp2_ring_zigzag_linear_overlap": (2, tiny(parallel={"sp": 2, "linear_method": "lasp2",
                                                               "linear_overlap": True},
                                                        model={"linear_variant": "linear"})),
    "pp2_2microbatches": (2, tiny(parallel={"pp": 2}, data={"micro_batch_size": 2})),
    "dp2": (2, tiny(model={"linear_variant": "simple_gla"})),
    "tp2_sp2": (4, tiny(parallel={"tp": 2, "sp": 2})),
}
VARIANTS = ("linear", "lightning", "simple_gla", "gla")


def _one_step(cfg_dict):
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, cfg_dict))
    m = t.train_step()
    tensors = local_tensors(t)  # before evaluate(): it must not touch weights or gradients
    return {"loss": m["loss"], "grad_norm": m["grad_norm"], "val": t.evaluate(), **tensors}


def _refs(rank, world):
    out = {v: _one_step(tiny(model={"linear_variant": v})) for v in VARIANTS}
    out["checkpointed"] = _one_step(tiny(schedule={"activation_checkpointing": True}))
    return out


def _cases(rank, world, names):
    return {n: _one_step(CASES[n][1]) for n in names}


@pytest.fixture(scope="module")
def results():
    refs = run_distributed(_refs, 1)[0]
    out = {}
    for world in (2, 4):
        names = [n for n, (w, _) in CASES.items() if w == world]
        per_rank = run_distributed(_cases, world, names)
        for n in names:
            out[n] = [r[n] for r in per_rank]
    return refs, out


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_matches_single_device(results, case):
    refs, out = results
    ranks = out[case]
    ref = refs[CASES[case][1]["model"]["linear_variant"]]
    for r in ranks:  # every rank reports the same global loss
        assert abs(r["loss"] - ref["loss"]) <= TOL * abs(ref["loss"]), (case, r["loss"], ref["loss"])
        assert abs(r["grad_norm"] - ref["grad_norm"]) <= TOL * ref["grad_norm"]
        assert abs(r["val"] - ref["val"]) <= TOL * ref["val"]  # forward-only schedule after the step
    params, grads = assemble(ranks)
    ref_params, ref_grads = assemble([ref])
    assert params.keys() == ref_params.keys()
    for name in ref_params:
        assert params[name].shape == ref_params[name].shape, name
        assert rel_err(grads[name], ref_grads[name]) <= TOL, (case, name, rel_err(grads[name], ref_grads[name]))
        assert rel_err(params[name], ref_params[name]) <= TOL, (case, name)


def test_step_changes_parameters(results):
    """Guard against a vacuous comparison: the step moved the weights and the gradients are not zero."""
    refs, _ = results
    ref = refs["lightning"]
    params, grads = assemble([ref])
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "embed" not in n)
    assert ref["loss"] > 1.0


def test_activation_checkpointing_changes_nothing(results):
    refs, _ = results
    ref, ck = refs["lightning"], refs["checkpointed"]
    assert abs(ck["loss"] - ref["loss"]) <= TOL * ref["loss"]
    params, grads = assemble([ck])
    ref_params, ref_grads = assemble([ref])
    for name in ref_params:
        assert rel_err(grads[name], ref_grads[name]) <= TOL, name
        assert rel_err(params[name], ref_params[name]) <= TOL, name
