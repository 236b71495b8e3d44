"""`longscan train` as a user runs it, under signals and failures: SIGTERM/SIGUSR1 save and resume exactly,
a killed launcher takes its ranks with it, a stopped rank makes the others fail with a named collective
timeout, a node without peers says whom it waits for and gives up, bad directories are refused early."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--nproc", "2", "parallel.sp=2", "parallel.linear_method=lasp2", "model.dim=64", "data.seq_len=64",
        "data.global_batch_size=2", "schedule.val_every=0", "schedule.val_batches=1", "schedule.warmup_steps=2",
        "logging.log_every=1", "logging.tensorboard=false"]


def _start(tmp_path, name, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen([sys.executable, "-m", "longscan.cli", "train", *args], cwd=tmp_path, env=env,
                            stdout=out, stderr=err)


def _finish(p, tmp_path, name, timeout=300):
    try:
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    return rc, (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _wait_for_step(run_dir, step, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and max(_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _ranks_of(launcher_pid):
    """rank -> pid of the launcher's children (their RANK from /proc)."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        pids = [int(x) for x in f.read().split()]
    out = {}
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        out[int(env[b"RANK"])] = pid
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_sigterm_and_sigusr1_save_and_resume_exactly(tmp_path):
    steps = ["schedule.steps=60"]
    ref = _start(tmp_path, "ref", *TINY, *steps, f"logging.dir={tmp_path / 'ref'}")
    rc, out, err = _finish(ref, tmp_path, "ref")
    assert rc == 0, out + err
    reference = _losses(tmp_path / "ref")
    ck = f"checkpoint.dir={tmp_path / 'ck'}"
    # SIGTERM with checkpoint.on_signal=true: stop at a step boundary after saving (exit 143).
    a = _start(tmp_path, "a", *TINY, *steps, ck, "checkpoint.on_signal=true", f"logging.dir={tmp_path / 'a'}")
    _wait_for_step(tmp_path / "a", 2, a)
    a.send_signal(signal.SIGTERM)
    rc, out, err = _finish(a, tmp_path, "a")
    assert rc == 143, out + err
    s1 = max(_losses(tmp_path / "a"))
    assert f"stopped by SIGTERM after step {s1}" in out and s1 < 60
    assert os.path.isfile(tmp_path / "ck" / f"step_{s1:08d}" / "COMPLETE")
    # SIGUSR1 (SLURM's warning before the time limit): save and exit 75, "requeue me".
    b = _start(tmp_path, "b", *TINY, *steps, ck, f"logging.dir={tmp_path / 'b'}")
    _wait_for_step(tmp_path / "b", s1 + 2, b)
    os.kill(b.pid, signal.SIGUSR1)
    rc, out, err = _finish(b, tmp_path, "b")
    assert rc == 75, out + err
    s2 = max(_losses(tmp_path / "b"))
    assert f"resumed from {tmp_path / 'ck'}/step_{s1:08d} at step {s1}" in out
    assert os.path.isfile(tmp_path / "ck" / f"step_{s2:08d}" / "COMPLETE") and s2 < 60
    c = _start(tmp_path, "c", *TINY, *steps, ck, f"logging.dir={tmp_path / 'c'}")
    rc, out, err = _finish(c, tmp_path, "c")
    assert rc == 0, out + err
    pieces = {**_losses(tmp_path / "a"), **_losses(tmp_path / "b"), **_losses(tmp_path / "c")}
    assert sorted(pieces) == list(range(1, 61))
    assert pieces == reference  # bit-identical losses across two signalled stops


def test_killed_launcher_takes_its_ranks_and_holds_the_directory_until_then(tmp_path):
    ck = f"checkpoint.dir={tmp_path / 'ck'}"
    a = _start(tmp_path, "a", *TINY, "schedule.steps=100000", ck, "checkpoint.every=5", f"logging.dir={tmp_path / 'a'}")
    try:
        _wait_for_step(tmp_path / "a", 1, a)
        ranks = _ranks_of(a.pid)
        assert sorted(ranks) == [0, 1]
        second = _start(tmp_path, "second", *TINY, ck)
        rc, out, err = _finish(second, tmp_path, "second", timeout=120)
        assert rc == 2 and f"is in use by another run: pid {ranks[0]} on host" in err, out + err
        a.send_signal(signal.SIGKILL)
        a.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in ranks.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in ranks.values()), "ranks kept running after their launcher was killed"
    finally:
        if a.poll() is None:
            a.kill()


def test_stopped_rank_gives_a_named_collective_timeout(tmp_path):
    a = _start(tmp_path, "a", *TINY, "schedule.steps=100000", "parallel.timeout_s=3", "--failure-grace", "1",
               f"logging.dir={tmp_path / 'a'}")
    try:
        _wait_for_step(tmp_path / "a", 1, a)
        ranks = _ranks_of(a.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        rc, out, err = _finish(a, tmp_path, "a", timeout=120)
    finally:
        for pid in (locals().get("ranks") or {}).values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert rc == 4, out + err
    assert "rank 0: a collective timed out after 3 s (parallel.timeout_s) during " in err, err
    assert "not responding (stopped or dead): rank 1." in err, err
    assert "killing rank 1" in err and not _alive(ranks[1])


def test_node_without_peers_reports_and_gives_up(tmp_path):
    p0, p1 = free_port(), free_port()
    common = ["--nproc", "1", "--nnodes", "2", "--rdzv-timeout", "4", "--master-addr", "127.0.0.1",
              "parallel.sp=1", "model.dim=64"]
    master = _start(tmp_path, "n0", *common, "--node-rank", "0", "--master-port", str(p0))
    worker = _start(tmp_path, "n1", *common, "--node-rank", "1", "--master-port", str(p1))
    rc0, out0, err0 = _finish(master, tmp_path, "n0", timeout=180)
    rc1, out1, err1 = _finish(worker, tmp_path, "n1", timeout=180)
    assert rc0 == 6, out0 + err0
    assert f"waiting for 1 of 2 ranks to join at 127.0.0.1:{p0}: ranks 1 (node rank 1)" in err0, err0
    assert f"rendezvous at 127.0.0.1:{p0} timed out after 4 s: ranks 1 (node rank 1) never joined" in err0, err0
    assert rc1 == 6, out1 + err1
    assert f"waiting for the rendezvous store of rank 0 at 127.0.0.1:{p1}" in err1, err1
    assert f"could not reach rank 0's rendezvous store at 127.0.0.1:{p1} within 4 s" in err1, err1


def test_bad_directory_and_options_refused_before_start(tmp_path):
    done = tmp_path / "ck" / "step_00000004"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text("{}")
    rc, out, err = _finish(_start(tmp_path, "a", *TINY, f"checkpoint.dir={tmp_path / 'ck'}",
                                  "checkpoint.resume=false"), tmp_path, "a")
    assert rc == 2 and "already holds checkpoints (step_00000004)" in err and "checkpoint.overwrite=true" in err, err
    rc, out, err = _finish(_start(tmp_path, "b", *TINY, "parallel.timeout_s=-1"), tmp_path, "b")
    assert rc == 2 and "parallel.timeout_s must be >= 0" in err, err
    rc, out, err = _finish(_start(tmp_path, "c", *TINY, "--nnodes", "2"), tmp_path, "c")
    assert rc == 2 and "--master-port" in err, err
    rc, out, err = _finish(_start(tmp_path, "d", *TINY, "--failure-grace", "-1"), tmp_path, "d")
    assert rc == 2 and "--failure-grace must be >= 0 seconds, got -1.0" in err, err
