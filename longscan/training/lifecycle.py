"""What a rank process does about its surroundings: exit codes, stop signals, a dead launcher.

Exit codes of `longscan train` (the launcher returns its ranks' code):

  0    finished
  1    a rank failed (its traceback is printed)
  2    bad input: config, data, a checkpoint directory in use or holding checkpoints that cannot resume
  3    stopped: ``schedule.max_skipped_steps`` consecutive steps had a non-finite loss or gradient norm
  4    a collective timed out (``parallel.timeout_s``): a peer rank is stopped, dead or far slower
  5    the launcher died (the rank exits instead of training on)
  6    rendezvous timed out: not every node joined
  75   SIGUSR1: saved a checkpoint (when ``checkpoint.dir`` is set) and stopped; requeue the job to resume
  130  SIGINT, 143 SIGTERM: stopped at a step boundary (after a checkpoint when ``checkpoint.on_signal``)
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_COLLECTIVE_TIMEOUT = 4
EXIT_LAUNCHER_GONE = 5
EXIT_RENDEZVOUS = 6
EXIT_REQUEUE = 75
"""EX_TEMPFAIL: the job stopped on request (SIGUSR1, what SLURM's --signal sends) and should be requeued."""

# Priority when ranks saw different signals: a requeue request (saves) wins over a stop.
_PRIORITY = {signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGUSR1: 3}
_BY_PRIORITY = {v: k for k, v in _PRIORITY.items()}


def exit_code_for(signum: int) -> int:
    """The exit code of a run stopped by ``signum``."""
    return EXIT_REQUEUE if signum == signal.SIGUSR1 else 128 + signum


class StopRequest:
    """Records SIGTERM / SIGINT / SIGUSR1 for the training loop, which acts on it at the next step
    boundary (all ranks agree through the step's flag all-reduce). ``install()`` sets the handlers."""

    def __init__(self):
        self.priority = 0

    def install(self) -> "StopRequest":
        for s in _PRIORITY:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.priority = max(self.priority, _PRIORITY[signum])

    @staticmethod
    def signal_of(priority: int) -> signal.Signals:
        return _BY_PRIORITY[priority]


_PR_SET_PDEATHSIG = 1


def watch_parent(expected_parent: int, rank: int, interval_s: float = 1.0) -> None:
    """Exit when the launcher (our parent) dies: the kernel's parent-death signal on Linux, and a watchdog
    thread for other systems and for a parent that died before the signal was armed."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it

    def gone() -> None:
        print(f"longscan train: rank {rank}: its launcher (pid {expected_parent}) is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(EXIT_LAUNCHER_GONE)

    if os.getppid() != expected_parent:
        gone()

    def watchdog() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != expected_parent:
                gone()

    threading.Thread(target=watchdog, name="longscan-parent-watchdog", daemon=True).start()
