"""`longscan sweep`: the length search, the per-attempt measurements on 2 gloo processes, an out-of-memory
outcome agreed by every rank with the sweep going on, the outputs, and bad input refused before launch."""
from __future__ import annotations

import csv
import os

import pytest

from harness import run_distributed

MODEL = ["model.dim=32", "model.n_layers=2", "model.pattern=LN", "model.n_heads=2", "model.n_kv_heads=2",
         "parallel.linear_backend=torch", "data.global_batch_size=2", "schedule.val_every=0"]


def test_longest_fit_doubles_then_bisects():
    from longscan.observe.sweep import longest_fit
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 1000
    assert longest_fit(100, 64, 1 << 20, fits) == 960
    assert tried == [64, 128, 256, 512, 1024, 768, 896, 960]
    assert longest_fit(64, 64, 300, lambda n: True) == 256          # stops doubling at max_len
    assert longest_fit(64, 64, 300, lambda n: False) == 0            # not even the first fits


def _sweep(rank, world, out):
    from longscan.observe.sweep import SweepOptions, attempt, run_sweep, write_outputs
    # rank 1 alone is "out of memory" (a cap of 1 MiB): both ranks must record the OOM, and go on
    capped = SweepOptions(seq_lens=(128,), steps=1, warmup=0, memory_cap_mb=1.0 if rank == 1 else 0.0)
    oom = attempt(None, MODEL, 2, 128, capped)
    # a run's checkpoint directory is neither locked, resumed from nor written by the sweep's attempts
    ckpt = os.path.join(out, "ckpt")
    rows = run_sweep(None, MODEL + [f"checkpoint.dir={ckpt}"],
                     SweepOptions(seq_lens=(128,), sp_sizes=(1, 2), steps=1, warmup=0))
    assert not os.path.exists(ckpt)
    if rank == 0:
        write_outputs([oom] + rows, out)
    return oom, rows


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep"))
    return run_distributed(_sweep, 2, out), out


def test_oom_agreed_and_sweep_goes_on(results):
    res, _ = results
    (oom0, rows0), (oom1, rows1) = res
    assert oom0.status == oom1.status == "oom"
    assert oom0.note == "out of memory on another rank" and oom1.note == "over --memory-cap-mb"
    assert [r.status for r in rows0] == [r.status for r in rows1] == ["ok", "ok"]


def test_rows_measure(results):
    res, _ = results
    rows = res[0][1]
    assert [(r.sp, r.dp, r.gpus, r.seq_len) for r in rows] == [(1, 2, 2, 128), (2, 1, 2, 128)]
    for r in rows:
        assert r.step_time_s > 0 and r.tokens_per_s_per_gpu == pytest.approx(r.tokens_per_s / 2)
        assert r.peak_allocated_mb > 0 and r.peak_reserved_mb is None and r.mfu is None
    assert all(0 < r.exposed_comm_fraction < 1 for r in rows)   # SP 1 × DP 2: the gradient all-reduce


def test_outputs(results):
    _, out = results
    with open(os.path.join(out, "sweep.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["oom", "ok", "ok"]
    md = open(os.path.join(out, "sweep.md")).read()
    assert "| Sequence length | GPUs |" in md and "OOM" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert os.path.getsize(os.path.join(out, "sweep.png")) > 0


def test_bad_input_refused_before_launch(capsys, monkeypatch):
    from longscan.observe.sweep import cmd_sweep
    monkeypatch.delenv("RANK", raising=False)
    assert cmd_sweep(["--nproc", "2", "--seq-lens", "130", "parallel.sp=2"] + MODEL) == 2
    assert "data.seq_len = 130" in capsys.readouterr().err
    assert cmd_sweep(["--nproc", "2", "--seq-lens", "128,x"] + MODEL) == 2
    assert "--seq-lens must be comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cmd_sweep(["--seq-lens", "128", "--max"])
