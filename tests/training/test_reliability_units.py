"""Single-process pieces of the reliability story: the directory lock, the restricted metadata
unpickler, pruning that spares other runs' checkpoints, and the layout comparison."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import warnings

import pytest
import torch

from longscan.training import checkpoint as ckpt
from longscan.training.lock import DirectoryLock, LockError, check_free, read_holder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    a = DirectoryLock(str(tmp_path)).acquire()
    h = read_holder(str(tmp_path))
    assert (h.host, h.pid) == (socket.gethostname(), os.getpid())
    with pytest.raises(LockError, match=f"in use by another run: pid {os.getpid()} on host {socket.gethostname()}"):
        DirectoryLock(str(tmp_path)).acquire()
    with pytest.raises(LockError, match="in use by another run"):
        check_free(str(tmp_path))
    a.release()
    assert read_holder(str(tmp_path)) is None
    DirectoryLock(str(tmp_path)).acquire().release()


def test_stale_lock_is_taken_over_and_foreign_host_respected(tmp_path):
    lock = tmp_path / "LOCK"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": "earlier"}))
    check_free(str(tmp_path))  # stale: passes
    DirectoryLock(str(tmp_path)).acquire()
    assert read_holder(str(tmp_path)).pid == os.getpid()
    lock.write_text(json.dumps({"host": "some-other-node", "pid": 1, "since": "earlier"}))
    with pytest.raises(LockError, match="on host some-other-node .*cannot tell whether it is still running"):
        DirectoryLock(str(tmp_path)).acquire()
    lock.write_text("garbage")
    with pytest.raises(LockError, match="unreadable lock file"):
        DirectoryLock(str(tmp_path)).acquire()


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_metadata_unpickler_refuses_foreign_globals(tmp_path):
    flag = tmp_path / "ran"
    with pytest.raises(ckpt.CheckpointError, match="refused to unpickle posix.system"):
        ckpt.load_metadata(pickle.dumps(_Payload(flag)), "planted/.metadata")
    assert not flag.exists()
    with pytest.raises(ckpt.CheckpointError, match="refused to unpickle builtins.eval"):
        ckpt.load_metadata(pickle.dumps(eval), "x")
    with pytest.raises(ckpt.CheckpointError, match="unreadable checkpoint metadata"):
        ckpt.load_metadata(b"\x80\x04garbage", "x")


def test_metadata_unpickler_reads_real_dcp_metadata(tmp_path):
    import torch.distributed.checkpoint as dcp
    state = {"a": torch.randn(3, 4), "b": torch.randn(2, dtype=torch.bfloat16), "s": torch.tensor(7),
             "rng": torch.random.get_rng_state()}
    with warnings.catch_warnings():  # DCP without a process group: "assuming ... a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path))
    md = ckpt.load_metadata((tmp_path / ".metadata").read_bytes(), "x")
    assert set(md.state_dict_metadata) == set(state)
    assert md.state_dict_metadata["a"].size == torch.Size([3, 4])


def _fake(ckpt_dir, step, run_id):
    d = ckpt_dir / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / ckpt.MARKER).write_text(json.dumps({"run_id": run_id}))
    return d


def test_prune_deletes_only_this_runs_older_checkpoints(tmp_path):
    for s in (1, 2, 3):
        _fake(tmp_path, s, "mine")
    _fake(tmp_path, 9, "other")
    (tmp_path / "step_00000004.tmp").mkdir()
    ckpt.prune(str(tmp_path), 1, "mine", protect=str(tmp_path / "step_00000002"))
    assert sorted(os.listdir(tmp_path)) == ["step_00000002", "step_00000003", "step_00000009"]
    ckpt.prune(str(tmp_path), 1, "mine")
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000009"]


def test_layout_differences_name_tp_pp_and_model_only():
    model = {"dim": 64, "n_layers": 4}
    saved = {"tp": 1, "pp": 1, "sp": 2, "dp": 2, "model": model}
    assert ckpt.layout_differences(saved, dict(saved, sp=4, dp=1)) == []
    assert ckpt.layout_differences(saved, dict(saved, tp=2, model=dict(model, dim=32))) == [
        "parallel.tp: checkpoint 1, this run 2", "model.dim: checkpoint 64, this run 32"]


def test_barrier_names_this_ranks_device_under_nccl(monkeypatch):
    """NCCL's groups are not bound to a device (their communicators come lazily), so the barrier names the
    rank's device rather than leave NCCL to guess it from the rank; gloo's takes none."""
    import torch.distributed as dist

    from longscan.distributed import sync
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend in ("nccl", "gloo"):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        sync.barrier()
    assert calls == [{"device_ids": [3]}, {}]
