"""Integration: training lowers the validation loss; stop + resume continues exactly; half-written
checkpoints are never loaded. One spawn of 4 gloo processes (SP 2 × DP 2) runs all three."""
from __future__ import annotations

import os
import shutil

import pytest

from harness import run_distributed
from training_common import tiny


def _train(cfg_dict):
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, cfg_dict))
    start = t.step
    return start, t.train()


def _plant_half_written(ckpt_dir):
    """What a run killed mid-save leaves behind: a .tmp directory with some shards but no metadata, and
    (for good measure) a step directory without the completion marker. Both are newer than step 3."""
    good = os.path.join(ckpt_dir, "step_00000003")
    half = os.path.join(ckpt_dir, "step_00000005.tmp")
    os.makedirs(half)
    for name in sorted(os.listdir(good))[:1]:
        if name != ".metadata":
            shutil.copy(os.path.join(good, name), half)
    unmarked = os.path.join(ckpt_dir, "step_00000004")
    shutil.copytree(good, unmarked)
    os.remove(os.path.join(unmarked, "COMPLETE"))
    with open(os.path.join(unmarked, ".metadata"), "wb") as f:
        f.write(b"truncated")  # loading this would fail loudly


def _all(rank, world, root):
    import torch.distributed as dist
    out = {}
    # 1. 30 steps of the tiny default (the embedded config, shorter sequences) lower the val loss.
    out["learn"] = _train({"data": {"seq_len": 256}, "schedule": {"steps": 30, "warmup_steps": 3,
                                                                  "val_every": 30, "val_batches": 2}})
    # 2. Uninterrupted run vs stop after step 3 + resume.
    base = tiny(parallel={"sp": 2}, schedule={"steps": 6, "warmup_steps": 2})
    full = dict(base, checkpoint={"dir": os.path.join(root, "full"), "every": 3})
    out["full"] = _train(full)
    resumable = dict(base, checkpoint={"dir": os.path.join(root, "stop"), "every": 3})
    out["stopped"] = _train(dict(resumable, logging={"stop_after": 3, "log_every": 1000}))
    if rank == 0:
        _plant_half_written(os.path.join(root, "stop"))
    dist.barrier()
    out["resumed"] = _train(resumable)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    return run_distributed(_all, 4, root), root


def test_thirty_steps_lower_validation_loss(runs):
    results, _ = runs
    _, hist = results[0]["learn"]
    (s0, v0), (s1, v1) = hist["val"][0], hist["val"][-1]
    assert (s0, s1) == (0, 30)
    assert v1 < v0 - 1.0, (v0, v1)  # from ~ln(320) at init to well below it
    assert len(hist["train"]) == 30


def test_resume_continues_exactly(runs):
    results, _ = runs
    for r in results:  # every rank agrees
        _, full = r["full"]
        start_stop, stopped = r["stopped"]
        start_res, resumed = r["resumed"]
        assert start_stop == 0 and [s for s, _ in stopped["train"]] == [1, 2, 3]
        assert start_res == 3, "resumed from the complete step-3 checkpoint, not a half-written newer one"
        assert stopped["train"] == full["train"][:3]
        assert [s for s, _ in resumed["train"]] == [4, 5, 6]
        assert resumed["train"] == full["train"][3:]  # bit-identical losses at steps 4..6
        assert resumed["val"][-1] == full["val"][-1]


def test_half_written_checkpoints_cleaned_after_next_save(runs):
    _, root = runs
    names = sorted(os.listdir(os.path.join(root, "stop")))
    assert not any(n.endswith(".tmp") for n in names), names
    assert "step_00000006" in names
