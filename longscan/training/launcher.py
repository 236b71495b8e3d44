"""The launcher of `longscan train`: checks the run once, starts one rank process per local GPU (or
``--nproc`` CPU processes), forwards stop signals to them and returns their exit code.

Ranks leave with their launcher (parent-death signal + watchdog in each rank); a rank that fails gets
``--failure-grace`` seconds for its peers to report, then the rest are killed; SIGTERM / SIGINT / SIGUSR1 are
forwarded and the ranks stop at the next step boundary (a second SIGTERM/SIGINT kills them at once).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from longscan.training.entry import LAUNCHER_PID_ENV, RDZV_TIMEOUT_ENV
from longscan.training.lifecycle import EXIT_REQUEUE, EXIT_USAGE

_STOP_CODES = (0, EXIT_REQUEUE, 128 + signal.SIGINT, 128 + signal.SIGTERM)


@dataclass(frozen=True)
class LaunchOptions:
    """Where the ranks of this node run and how they meet the other nodes'."""
    nproc: int
    """Rank processes on this node."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""
    """Host of node 0, where global rank 0 serves the rendezvous ('' = this host, single node only)."""
    master_port: int = 0
    """Its port; 0 = a free port (single node only)."""
    rdzv_timeout_s: float = 900.0
    """Fail when not every rank joined within this many seconds."""
    stop_timeout_s: float = 600.0
    """After a forwarded stop signal, kill ranks that have not exited within this many seconds."""
    failure_grace_s: float = 10.0
    """After one rank fails, the others get this long to print their own errors before they are killed."""

    def __post_init__(self):
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, --nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not (self.master_addr and 0 < self.master_port < 65536):
            raise ValueError("--nnodes > 1 needs --master-addr (node 0's host) and --master-port (1-65535) on every "
                             "node")
        if self.rdzv_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError("--rdzv-timeout and --stop-timeout must be > 0 seconds")
        if self.failure_grace_s < 0:
            raise ValueError(f"--failure-grace must be >= 0 seconds, got {self.failure_grace_s}")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def precheck(cfg) -> str | None:
    """What can be refused before any process starts: a checkpoint.dir held by a live run, or one that
    holds checkpoints while resume=false and overwrite=false. Returns the error line or None."""
    from longscan.training import checkpoint as ckpt
    from longscan.training.lock import LockError, check_free
    from longscan.training.trainer import check_reliability_options
    from longscan.training.config import ConfigError
    try:
        check_reliability_options(cfg)
    except ConfigError as e:
        return f"config error: {e}"
    c = cfg.checkpoint
    if not c.dir:
        return None
    try:
        check_free(c.dir)
    except LockError as e:
        return f"checkpoint.dir error: {e}"
    existing = [os.path.basename(p) for _, p in ckpt.complete(c.dir)]
    if existing and not c.resume and not c.overwrite:
        return (f"config error: checkpoint.dir {c.dir!r} already holds checkpoints ({', '.join(existing)}) and "
                "checkpoint.resume=false: set checkpoint.overwrite=true to delete them and start over, or use "
                "another checkpoint.dir")
    return None


def run_launcher(o: LaunchOptions, config: str | None, overrides: list[str]) -> int:
    """Check the run once (config, data, checkpoint directory), then :func:`launch` it."""
    from longscan.training.config import ConfigError, load_config, validate
    from longscan.training.data import DataError, open_token_file
    from longscan.training.memory import check_capacity
    from longscan.training.preflight import check_before_launch
    if config is None and not any(x.startswith("parallel.") for x in overrides):
        # The embedded default asks for SP 2; on one GPU it runs unsplit rather than not at all.
        try:
            p = load_config(None, overrides).parallel
        except ConfigError:
            p = None  # reported below
        if p is not None and o.world_size % (p.tp * p.pp * p.sp):
            print(f"longscan train: {o.world_size} process(es) cannot hold tp·pp·sp = {p.tp * p.pp * p.sp} of the "
                  "default config; running it with parallel.tp=1 parallel.pp=1 parallel.sp=1", flush=True)
            overrides = overrides + ["parallel.tp=1", "parallel.pp=1", "parallel.sp=1"]
    try:  # fail here, once, before starting processes
        cfg = validate(load_config(config, overrides), o.world_size)
        check_before_launch(cfg)   # optional packages the config needs, the token file against the vocabulary
        if cfg.data.source == "tokens":
            open_token_file(cfg.data.path)
        check_capacity(cfg, o.world_size, procs_per_node=o.nproc)  # the GPU and the host's share; on CPU the host
    except (ConfigError, DataError) as e:
        return usage_error(f"{'config' if isinstance(e, ConfigError) else 'data'} error: {e}")
    refusal = precheck(cfg)
    if refusal:
        return usage_error(refusal)
    return launch(o, (["--config", config] if config else []) + overrides)


def _describe(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def launch(o: LaunchOptions, rank_args: list[str]) -> int:
    """Start this node's ranks running `longscan train rank_args`; returns the run's exit code."""
    port = o.master_port or _free_port()
    base = dict(os.environ, MASTER_ADDR=o.master_addr or "127.0.0.1", MASTER_PORT=str(port),
                WORLD_SIZE=str(o.world_size), LOCAL_WORLD_SIZE=str(o.nproc), GROUP_RANK=str(o.node_rank), **{
                    LAUNCHER_PID_ENV: str(os.getpid()), RDZV_TIMEOUT_ENV: str(o.rdzv_timeout_s)})
    base.setdefault("OMP_NUM_THREADS", "1")
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        again = signum != signal.SIGUSR1 and received.count(signum) > 1
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if again else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        for local in range(o.nproc):
            rank = o.node_rank * o.nproc + local
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(local))
            procs.append(subprocess.Popen([sys.executable, "-m", "longscan.cli", "train", *rank_args], env=env))
        return _wait(o, procs, received)
    finally:
        for p in procs:  # whatever brought us here, no rank outlives the launcher
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in previous.items():
            signal.signal(s, h)


def _wait(o: LaunchOptions, procs: list[subprocess.Popen], received: list[int]) -> int:
    first_failure: tuple[int, int] | None = None
    fail_deadline = stop_deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        now = time.monotonic()
        if received and stop_deadline is None:
            stop_deadline = now + o.stop_timeout_s
        if first_failure is None:
            for i, c in enumerate(codes):
                if c is not None and c not in _STOP_CODES:
                    first_failure, fail_deadline = (i, c), now + o.failure_grace_s
                    print(f"longscan train: rank {o.node_rank * o.nproc + i} (pid {procs[i].pid}) {_describe(c)}; "
                          f"stopping the other ranks", file=sys.stderr, flush=True)
                    break
        if any(d is not None and now > d for d in (fail_deadline, stop_deadline)):
            for i, p in enumerate(procs):
                if p.poll() is None:
                    print(f"longscan train: killing rank {o.node_rank * o.nproc + i} (pid {p.pid}), which did not "
                          "exit", file=sys.stderr, flush=True)
                    p.kill()
            fail_deadline = stop_deadline = float("inf")
        time.sleep(0.1)
    if first_failure is not None:
        code = first_failure[1]
        return 128 - code if code < 0 else code
    nonzero = [c for c in codes if c != 0]
    if not nonzero:
        return 0
    code = max(nonzero, key=lambda c: (c == EXIT_REQUEUE, c))
    return 128 - code if code < 0 else code


def usage_error(msg: str) -> int:
    print(f"longscan train: {msg}", file=sys.stderr, flush=True)
    return EXIT_USAGE
