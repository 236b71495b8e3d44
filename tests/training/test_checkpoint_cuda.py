"""Checkpoints on a GPU: the trainer's collectives run over NCCL there (no CPU tensors), so saving, the
finiteness check before it and resuming are exercised on CUDA (skipped without a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--nproc", "1", "model.dim=64", "data.seq_len=64", "data.global_batch_size=2", "schedule.val_every=0",
        "schedule.warmup_steps=2", "logging.log_every=1", "logging.tensorboard=false"]


def _train(tmp_path, name, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "longscan.cli", "train", *TINY, *args,
                        f"logging.dir={tmp_path / name}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(tmp_path / name / "metrics.jsonl") as f:
        return p.stdout, {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checkpoint_saves_and_resumes_on_cuda(tmp_path):
    ck = f"checkpoint.dir={tmp_path / 'ck'}"
    _, first = _train(tmp_path, "a", "schedule.steps=4", ck, "checkpoint.every=2")
    for step in (2, 4):
        assert os.path.isfile(tmp_path / "ck" / f"step_{step:08d}" / "COMPLETE")
    out, later = _train(tmp_path, "b", "schedule.steps=6", ck, "checkpoint.every=2")
    assert f"resumed from {tmp_path / 'ck'}/step_{4:08d} at step 4" in out
    assert sorted(later) == [5, 6] and sorted(first) == [1, 2, 3, 4]
    assert all(map(torch.isfinite, map(torch.tensor, later.values())))
