"""Gradient reduction overlapped with the backward: the same gradients and update as one all-reduce after
it, bitwise (two ranks: each element is the sum of two values either way), with reductions started during the
backward; miscounted accumulations are an error, not a silent early reduction."""
from __future__ import annotations

import pytest
import torch

from harness import run_distributed
from training_common import local_tensors, tiny

# SP 2 × DP 2 over 4 ranks would be the full picture; 2 ranks with 2 microbatches each cover the counting
CASES = {"sp2": tiny(parallel={"sp": 2}, data={"global_batch_size": 2}),
         "dp2": tiny(model={"linear_variant": "gla"})}


def _step(cfg_dict, overlap: bool):
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    cfg = dict(cfg_dict, optimizer=dict(cfg_dict["optimizer"], overlap_grad_reduce=overlap))
    t = Trainer(load_config(None, cfg))
    started = []
    if overlap:
        finish = t.reducer.finish

        def spy():
            started.append(len(t.reducer.works))
            finish()
        t.reducer.finish = spy
    else:
        assert t.reducer is None
    m = t.train_step()
    m2 = t.train_step()          # a second step: counts restart
    return {"loss": (m["loss"], m2["loss"]), "started": started, "microbatches": t.num_microbatches,
            "n_params": len(t.params), **local_tensors(t)}


def _worker(rank, world):
    return {name: {ov: _step(cfg, ov) for ov in (True, False)} for name, cfg in CASES.items()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2)


@pytest.mark.parametrize("name", list(CASES))
def test_same_as_one_all_reduce_after_the_backward(results, name):
    for rank in results:
        on, off = rank[name][True], rank[name][False]
        assert on["loss"] == off["loss"]
        for key, (p, g, _) in on["tensors"].items():
            p0, g0, _ = off["tensors"][key]
            assert (p == p0).all() and (g == g0).all(), key


@pytest.mark.parametrize("name", list(CASES))
def test_reductions_start_during_the_backward(results, name):
    for rank in results:
        on = rank[name][True]
        assert on["microbatches"] == 2
        # every parameter is used every microbatch: all reductions were launched before the backward ended
        assert on["started"] == [on["n_params"]] * 2


def test_more_accumulations_than_microbatches_is_an_error():
    from longscan.training.grad_reduce import GradReducer
    w = torch.nn.Parameter(torch.ones(3))
    r = GradReducer([w], group=None, microbatches=1)
    r.start()
    r.active = False            # count without launching a collective (no process group here)
    r.counts[id(w)] = 1
    r.active = True
    with pytest.raises(RuntimeError, match="received 2 gradient accumulations"):
        r._accumulated(w)
    r.remove()
    assert not w._post_accumulate_grad_hooks
