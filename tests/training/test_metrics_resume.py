"""metrics.jsonl after a resume: the records a killed run wrote after its last checkpoint are dropped, so
every step appears once; a run from scratch starts a fresh file."""
from __future__ import annotations

import json

from longscan.training.metrics import MetricsLogger


def _steps(path):
    return [(r["step"], sorted(k for k in r if k != "step")) for r in map(json.loads, open(path))]


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    first = MetricsLogger(str(tmp_path), tensorboard=False, enabled=True)
    first.log(0, val_loss=5.0)
    for s in range(1, 6):  # checkpoint at step 3, killed after step 5
        first.log(s, loss=1.0 / s)
    first.log(3, val_loss=4.0)
    first.file.write('{"step": 6, "lo')  # a line cut short by the kill
    first.close()
    resumed = MetricsLogger(str(tmp_path), tensorboard=False, enabled=True, start_step=3)
    for s in range(4, 7):
        resumed.log(s, loss=0.5)
    resumed.close()
    path = tmp_path / "metrics.jsonl"
    assert _steps(path) == [(0, ["val_loss"]), (1, ["loss"]), (2, ["loss"]), (3, ["loss"]), (3, ["val_loss"]),
                            (4, ["loss"]), (5, ["loss"]), (6, ["loss"])]
    assert [r["loss"] for r in map(json.loads, open(path)) if r["step"] in (4, 5)] == [0.5, 0.5]
    fresh = MetricsLogger(str(tmp_path), tensorboard=False, enabled=True, start_step=0)
    fresh.log(0, val_loss=6.0)
    fresh.close()
    assert _steps(path) == [(0, ["val_loss"])]


def test_disabled_rank_writes_nothing(tmp_path):
    MetricsLogger(str(tmp_path / "run"), tensorboard=False, enabled=False).log(1, loss=1.0)
    assert not (tmp_path / "run").exists()
