"""launch/: both scripts parse; the Slurm script's preemption path runs against fake `srun`/`scontrol`/
`scancel` on PATH: SIGUSR1 reaches the trainer (through scancel), exit code 75 requeues the job, other codes
end it, the rendezvous port comes from the job id, and a config without checkpoint.dir is refused before
training starts."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")

# srun: log the call, drop srun's own options, run the task as rank 0 of 2 on this node.
FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=2 SLURM_NTASKS_PER_NODE=2
exec "$@"
"""
# scancel --signal=USR1 JOB: signal the (one) running task, whose pid the fake trainer wrote down.
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_LOG"
if [[ $1 == --signal=USR1 ]]; then kill -USR1 "$(cat "$FAKE_LOG.started")"; fi
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [[ $1 == show && $2 == hostnames ]]; then printf 'node7\\nnode8\\n'; fi
"""
# The task prefix stands in for the trainer. `config` runs for real when FAKE_CONFIG=real (it imports torch
# and megatron: slow), else prints the checkpoint section `longscan config` prints for a checkpoint.dir=
# argument. `train` logs its rendezvous and then either exits with FAKE_EXIT or, when FAKE_EXIT is "usr1",
# waits for SIGUSR1 and exits 75 (checkpointed).
FAKE_TRAINER = """#!/usr/bin/env bash
if [[ " $* " == *" config "* ]]; then
  if [[ $FAKE_CONFIG == real ]]; then exec "$@"; fi
  dir=''
  for a in "$@"; do if [[ $a == checkpoint.dir=* ]]; then dir=${a#checkpoint.dir=}; fi; done
  printf "model:\n  dim: 64\ncheckpoint:\n  dir: %s\n  every: 0\nlogging:\n  dir: runs\n" "$dir"
  exit 0
fi
echo "train rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE addr=$MASTER_ADDR port=$MASTER_PORT" \
     "args=${*: -1}" >> "$FAKE_LOG"
if [[ $FAKE_EXIT == usr1 ]]; then
  trap 'echo "train got USR1" >> "$FAKE_LOG"; exit 75' USR1
  echo $$ > "$FAKE_LOG.pid" && mv "$FAKE_LOG.pid" "$FAKE_LOG.started"
  for _ in $(seq 600); do sleep 0.1; done
  exit 3
fi
exit "$FAKE_EXIT"
"""


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL),
                       ("fake-trainer", FAKE_TRAINER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def _start(tmp_path, fake_exit, *args, fake_config="", **env):
    log = tmp_path / "calls.log"
    e = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
             FAKE_EXIT=fake_exit, FAKE_CONFIG=fake_config, PYTHONPATH=ROOT, SLURM_JOB_ID="123456",
             SLURM_JOB_NODELIST="node[7-8]",
             SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2", SLURM_NTASKS_PER_NODE="2",
             TASK_PREFIX=str(tmp_path / "bin" / "fake-trainer"), **env)
    e.pop("MASTER_PORT", None)
    p = subprocess.Popen(["bash", SBATCH, *args], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, log


def _finish(p, log):
    out, err = p.communicate(timeout=120)
    return p.returncode, out + err, log.read_text() if log.exists() else ""


def test_scripts_parse():
    for script in ("slurm.sbatch", "torchrun.sh"):
        r = subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_header_asks_for_the_warning_signal_and_requeue():
    text = open(SBATCH).read()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text


def test_usr1_checkpoint_exit_75_requeues(fakes):
    p, log = _start(fakes, "usr1", "checkpoint.dir=ck")
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{log}.started"):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.1)
    p.send_signal(signal.SIGUSR1)
    rc, out, calls = _finish(p, log)
    assert rc == 0, out
    assert "scancel --signal=USR1 123456" in calls and "train got USR1" in calls and "scontrol requeue 123456" in calls
    assert "train rank=0 local=0 world=2 addr=node7 port=23456 args=checkpoint.dir=ck" in calls


def test_other_exit_codes_end_the_job(fakes):
    for code in ("0", "1"):
        p, log = _start(fakes, code, "checkpoint.dir=ck")
        rc, out, calls = _finish(p, log)
        assert rc == int(code), out
        assert "train rank=0" in calls and "scontrol requeue" not in calls
        log.unlink()


def test_requeues_stop_at_max(fakes):
    p, log = _start(fakes, "75", "checkpoint.dir=ck", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    rc, out, calls = _finish(p, log)
    assert rc == 75 and "not requeueing" in out and "scontrol requeue" not in calls


def test_config_without_checkpoint_dir_is_refused(fakes):
    p, log = _start(fakes, "0", "schedule.steps=5", fake_config="real")
    rc, out, calls = _finish(p, log)
    assert rc == 2 and "set checkpoint.dir" in out and "train rank" not in calls
    p, log = _start(fakes, "0", "checkpoint.dir=ck", "model.heads=3", fake_config="real")
    rc, out, calls = _finish(p, log)
    assert rc != 0 and "unknown config key 'model.heads'" in out and "train rank" not in calls
