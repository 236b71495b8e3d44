"""End to end through the command line: prepare-data, then `longscan train` starting its own processes
(the path a user takes without torchrun), and the errors a user sees for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "longscan.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_prepare_data_then_train_two_processes(tmp_path):
    src = os.path.join(REPO, "longscan")
    p = _cli("prepare-data", "--output", str(tmp_path / "tok.bin"), "--suffix", ".py", src, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "tokens from" in p.stdout
    p = _cli("train", "--nproc", "2", "data.source=tokens", f"data.path={tmp_path / 'tok.bin'}",
             "parallel.sp=2", "parallel.linear_method=lasp2", "data.seq_len=64", "data.global_batch_size=2",
             "schedule.steps=4", "schedule.val_every=2", "schedule.val_batches=1", "logging.log_every=1",
             f"logging.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "world 2 = tp 1 × pp 1 × sp 2 × dp 1" in p.stdout
    assert "done: train loss" in p.stdout and "step     4/4" in p.stdout
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4] and all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert os.path.isfile(tmp_path / "ckpt" / "step_00000004" / "COMPLETE")


def test_user_errors_exit_cleanly(tmp_path):
    p = _cli("train", "--nproc", "2", "data.source=tokens", f"data.path={tmp_path / 'missing.bin'}", cwd=tmp_path)
    assert p.returncode == 2 and "data error" in p.stderr and "longscan prepare-data" in p.stderr
    p = _cli("train", "--nproc", "4", "parallel.tp=3", cwd=tmp_path)
    assert p.returncode == 2 and "config error: world size 4 is not divisible by tp·pp·sp" in p.stderr
    p = _cli("train", "--nproc", "2", "model.heads=4", cwd=tmp_path)
    assert p.returncode == 2 and "unknown config key 'model.heads'" in p.stderr
