"""Optional: the DeepSpeed ZeRO-1 engine trains exactly like the torch AdamW engine (PP 2 × DP 2)."""
from __future__ import annotations

import pytest

from harness import rel_err, run_distributed
from training_common import assemble, local_tensors, tiny

pytest.importorskip("deepspeed")


def _three_steps(cfg):
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, cfg))
    ms = [t.train_step() for _ in range(3)]
    return [m["loss"] for m in ms], [m["grad_norm"] for m in ms], local_tensors(t)


def _both(rank, world):
    base = tiny(parallel={"pp": 2}, data={"micro_batch_size": 2, "global_batch_size": 8})
    ds = tiny(parallel={"pp": 2}, data={"micro_batch_size": 2, "global_batch_size": 8},
              optimizer={"engine": "deepspeed", "zero_stage": 1})
    return _three_steps(base), _three_steps(ds)


def test_zero1_matches_torch_adamw():
    res = run_distributed(_both, 4)
    for torch_run, ds_run in res:
        for a, b in zip(torch_run[0], ds_run[0]):
            assert abs(a - b) <= 1e-5 * abs(a)
        for a, b in zip(torch_run[1], ds_run[1]):
            assert abs(a - b) <= 1e-5 * abs(a)  # clip norm over TP×PP with duplicates counted once
    p_t, _ = assemble([r[0][2] for r in res])
    p_d, _ = assemble([r[1][2] for r in res])
    for name in p_t:
        assert rel_err(p_d[name], p_t[name]) <= 1e-5, name
