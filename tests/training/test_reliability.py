"""Reliability of the training state, in one spawn of 4 gloo processes: non-finite steps are skipped and
stop the run; corrupt, foreign or planted checkpoints are not loaded; a run with another model is
refused; SP/DP/TP/PP changes resume; one run per checkpoint directory."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket

import pytest

from harness import run_distributed
from training_common import tiny


class _Planted:
    """A pickle that runs a command when unpickled (what a planted .metadata could hold)."""

    def __init__(self, flag_path):
        self.flag_path = flag_path

    def __reduce__(self):
        return (os.system, (f"touch {self.flag_path}",))


def _trainer(cfg):
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    return Trainer(load_config(None, cfg))


def _run(cfg):
    t = _trainer(cfg)
    try:
        start = t.step
        return start, t.train()
    finally:
        t.close()


def _error(cfg):
    """The error a Trainer raises for ``cfg`` (type name, message), or None."""
    try:
        t = _trainer(cfg)
    except Exception as e:
        return type(e).__name__, str(e)
    t.close()
    return None


def _params_and_moments(t):
    import torch
    out = {f"p/{n}": p.detach().clone() for n, p in t.model.named_parameters()}
    for n, p in t.model.named_parameters():
        for k, v in t.optimizer.state[p].items():
            out[f"o/{n}/{k}"] = v.clone() if torch.is_tensor(v) else v
    return out


def _same(a, b):
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                        for k in a if not (torch.is_tensor(a[k]) and a[k].isnan().any())) \
        and all(torch.equal(a[k].isnan(), b[k].isnan()) for k in a if torch.is_tensor(a[k]))


def _corrupt(path, how):
    """Damage checkpoint directory ``path`` the way a crash, a full disk or a bad disk would."""
    shard = sorted(n for n in os.listdir(path) if n.endswith(".distcp"))[0]
    f = os.path.join(path, shard)
    if how == "truncated shard":
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        return shard
    if how == "flipped tensor byte":
        with open(f, "r+b") as fh:
            fh.seek(os.path.getsize(f) // 2)
            b = fh.read(1)
            fh.seek(-1, 1)
            fh.write(bytes([b[0] ^ 0x10]))
        return shard
    if how == "garbage metadata":
        with open(os.path.join(path, ".metadata"), "wb") as fh:
            fh.write(b"\x80\x04garbage")
        return ".metadata"
    if how == "garbage marker":
        with open(os.path.join(path, "COMPLETE"), "w") as fh:
            fh.write("{not json")
        return "COMPLETE"
    raise ValueError(how)


def _all(rank, world, root):
    import torch
    import torch.distributed as dist
    from longscan.training import checkpoint as ckpt
    out = {}

    # 1. Three good steps with checkpoints (keep=1), then resumed with lr=1e6: step 4's update blows the
    #    model up, steps 5-7 are non-finite and skipped, and the run stops.
    nan_dir, nan_log = os.path.join(root, "nan"), os.path.join(root, "nan_log")
    nan_cfg = tiny(schedule={"steps": 12, "warmup_steps": 0, "max_skipped_steps": 3},
                   checkpoint={"dir": nan_dir, "every": 1, "keep": 1})
    _run(dict(nan_cfg, logging={"stop_after": 3, "log_every": 1000}))
    t = _trainer(dict(nan_cfg, optimizer=dict(nan_cfg["optimizer"], lr=1e6), logging={"dir": nan_log, "log_every": 1}))
    try:
        t.train()
        out["nan_error"] = None
    except Exception as e:
        out["nan_error"] = (type(e).__name__, str(e))
    out["nan_listing"] = sorted(os.listdir(nan_dir))
    out["nan_step"] = t.step
    # One more step from the diverged state: skipped on every rank, nothing changes.
    before = _params_and_moments(t)
    m = t.train_step()
    out["extra_skip"] = (m["skipped"], _same(before, _params_and_moments(t)))
    t.close()
    dist.barrier()
    # What is left resumes, from finite state.
    t = _trainer(nan_cfg)
    out["nan_resumed"] = (t.step, all(bool(torch.isfinite(p).all()) for p in t.model.parameters()))
    t.close()
    out["rank0_pid"] = os.getpid() if rank == 0 else None

    # 2. Reference runs: SP 2 × DP 2, 6 steps uninterrupted; and stopped after step 3 with checkpoints.
    base = tiny(parallel={"sp": 2}, schedule={"steps": 6, "warmup_steps": 2})
    out["full"] = _run(base)
    good = os.path.join(root, "good")
    out["stopped"] = _run(dict(base, checkpoint={"dir": good, "every": 1, "keep": 3}, logging={"stop_after": 3}))

    # 3. SP and DP changes resume (same world of 4): SP 4 × DP 1 and SP 1 × DP 4 from the SP 2 checkpoint.
    for sp in (4, 1):
        d = os.path.join(root, f"sp{sp}")
        if rank == 0:
            shutil.copytree(good, d)
            os.remove(os.path.join(d, "LOCK")) if os.path.exists(os.path.join(d, "LOCK")) else None
        dist.barrier()
        out[f"resume_sp{sp}"] = _run(dict(base, parallel={"sp": sp}, checkpoint={"dir": d, "keep": 3}))

    # 4. Other model: one clear error naming what differs; other TP or PP: resharded on load.
    out["mismatch"] = {
        "tp": _error(dict(base, parallel={"sp": 2, "tp": 2}, checkpoint={"dir": good})),
        "pp": _error(dict(base, parallel={"sp": 1, "pp": 2}, checkpoint={"dir": good})),
        "dim": _error(dict(base, model=dict(base["model"], dim=32), checkpoint={"dir": good})),
    }

    # 5. A damaged newest checkpoint is skipped, naming its bad file; the previous one is chosen.
    out["corrupt"] = {}
    for how in ("truncated shard", "flipped tensor byte", "garbage metadata", "garbage marker"):
        newest = os.path.join(good, "step_00000009")
        bad = None
        if rank == 0:
            shutil.copytree(os.path.join(good, "step_00000003"), newest)
            bad = _corrupt(newest, how)
        dist.barrier()
        t = _trainer(dict(base, checkpoint={"dir": good}))
        layout = t.layout()
        t.close()
        path, _, notes = ckpt.select(good, layout)
        out["corrupt"][how] = (os.path.basename(path), notes, bad)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(newest)
        dist.barrier()

    # 6. A planted .metadata pickle with a matching marker: refused, its payload never runs.
    flag = os.path.join(root, "PAYLOAD_RAN")
    planted = os.path.join(good, "step_00000010")
    if rank == 0:
        shutil.copytree(os.path.join(good, "step_00000003"), planted)
        with open(os.path.join(planted, ".metadata"), "wb") as f:
            pickle.dump(_Planted(flag), f)
        with open(os.path.join(planted, "COMPLETE")) as f:
            marker = json.load(f)
        marker["files"][".metadata"] = ckpt.sha256_file(os.path.join(planted, ".metadata"))
        with open(os.path.join(planted, "COMPLETE"), "w") as f:
            json.dump(marker, f)
    dist.barrier()
    out["planted"] = _error(dict(base, checkpoint={"dir": good}))
    out["payload_ran"] = os.path.exists(flag)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(planted)
    dist.barrier()

    # 7. One run per directory: a second run is refused while the first holds it.
    first = _trainer(dict(base, checkpoint={"dir": good}))
    out["second_run"] = _error(dict(base, checkpoint={"dir": good}))
    first.close()
    # resume=false into a directory with checkpoints: refused unless overwrite=true.
    out["no_resume"] = _error(dict(base, checkpoint={"dir": good, "resume": False}))
    out["overwrite"] = _run(dict(base, schedule=dict(base["schedule"], steps=2),
                                 checkpoint={"dir": good, "resume": False, "overwrite": True, "keep": 1}))
    out["overwrite_listing"] = sorted(os.listdir(good))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rel"))
    return run_distributed(_all, 4, root), root


def test_non_finite_steps_are_skipped_then_stop_the_run(runs):
    results, root = runs
    for r in results:
        name, msg = r["nan_error"]
        assert name == "TrainingDiverged", msg
        assert "stopping at step 7: 3 consecutive steps (5-7) had a non-finite loss" in msg, msg
        assert "newest finite checkpoint is" in msg and msg.endswith("step_00000003"), msg
        assert r["extra_skip"] == (True, True), "a skipped step changed parameters or optimizer state"
    records = []
    with open(os.path.join(root, "nan_log", "metrics.jsonl")) as f:
        for line in f:  # strict JSON: a bare NaN/Infinity is refused
            records.append(json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")))
    assert [(r["step"], r["skipped"]) for r in records if "loss" in r] == [(4, False), (5, True), (6, True), (7, True)]
    skipped = [r for r in records if r.get("skipped")]
    assert all(r["loss"] is None or r["grad_norm"] is None for r in skipped)
    assert skipped[-1]["skipped_total"] == 3


def test_non_finite_run_keeps_the_last_finite_checkpoint(runs):
    results, _ = runs
    r = results[0]
    # keep=1, yet step 3 survives the save of step 4, whose state only ever gave non-finite steps and is set aside.
    assert [n for n in r["nan_listing"] if n != "LOCK"] == ["step_00000003", "step_00000004.diverged"], r["nan_listing"]
    for r in results:
        assert r["nan_resumed"] == (3, True)


def test_resume_with_other_sp_and_dp_matches_uninterrupted(runs):
    import math
    results, _ = runs
    for r in results:
        _, full = r["full"]
        start, stopped = r["stopped"]
        assert stopped["train"] == full["train"][:3]
        for sp in (4, 1):
            start, resumed = r[f"resume_sp{sp}"]
            assert start == 3 and [s for s, _ in resumed["train"]] == [4, 5, 6]
            for (s, a), (_, b) in zip(resumed["train"], full["train"][3:]):
                assert math.isclose(a, b, rel_tol=1e-5), (sp, s, a, b)


@pytest.mark.parametrize("what,expected", [("dim", "model.dim: checkpoint 64, this run 32")])
def test_other_model_is_refused(runs, what, expected):
    results, _ = runs
    for r in results:
        name, msg = r["mismatch"][what]
        assert name == "CheckpointMismatch" and expected in msg and "cannot resume from" in msg, msg


@pytest.mark.parametrize("what", ["tp", "pp"])
def test_other_tp_or_pp_is_resharded_not_refused(runs, what):
    """Exactness across the change: test_reshard.py."""
    results, _ = runs
    for r in results:
        assert r["mismatch"][what] is None, r["mismatch"][what]


@pytest.mark.parametrize("how", ["truncated shard", "flipped tensor byte", "garbage metadata", "garbage marker"])
def test_damaged_newest_checkpoint_falls_back(runs, how):
    results, _ = runs
    for r in results:
        chosen, notes, _ = r["corrupt"][how]
        bad = results[0]["corrupt"][how][2]
        assert chosen == "step_00000003"
        assert len(notes) == 1 and "step_00000009" in notes[0] and bad in notes[0], notes


def test_planted_pickle_is_refused_and_never_runs(runs):
    results, _ = runs
    for r in results:
        name, msg = r["planted"]
        assert name == "CheckpointError" and "refused to unpickle posix.system" in msg, msg
        assert not r["payload_ran"]


def test_one_run_per_checkpoint_directory(runs):
    results, _ = runs
    r = results[0]
    name, msg = r["second_run"]
    assert name == "LockError" and f"pid {r['rank0_pid']} on host" in msg, msg
    assert "in use by another run" in msg and f"on host {socket.gethostname()}" in msg, msg
    name, msg = r["no_resume"]
    assert name == "ConfigError" and "checkpoint.overwrite=true" in msg and "step_00000003" in msg, msg
    start, hist = r["overwrite"]
    assert start == 0 and [s for s, _ in hist["train"]] == [1, 2]
    assert [n for n in r["overwrite_listing"] if n.startswith("step_")] == ["step_00000002"]
