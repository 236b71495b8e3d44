"""Which rank stopped answering: every rank bumps a counter in the rendezvous store from a thread.

A collective that times out says only that a peer did not come; the counters say which one. A rank that is
stopped (SIGSTOP, a frozen node) or dead stops counting; a rank that is merely slow keeps counting.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

_KEY = "longscan/heartbeat/"


class Heartbeat:
    """Started by each rank after the rendezvous; :meth:`silent_ranks` asks the store who stopped."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, interval_s: float = 1.0):
        self.addr, self.port, self.rank, self.world = master_addr, master_port, rank, world_size
        self.interval_s = interval_s
        self._store = self._client(timeout_s=30.0)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="longscan-heartbeat", daemon=True)
        self._thread.start()

    @property
    def beating(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop counting and wait for the thread: a daemon thread still inside a store call when the interpreter
        exits is killed there, and unwinding its C++ frames aborts the process ("terminate called without an
        active exception") after a run that finished."""
        self._stopped.set()
        self._thread.join(timeout_s)

    def _client(self, timeout_s: float) -> dist.TCPStore:
        return dist.TCPStore(self.addr, self.port, self.world, is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    def _beat(self) -> None:
        try:
            while not self._stopped.is_set():
                self._store.add(f"{_KEY}{self.rank}", 1)
                self._stopped.wait(self.interval_s)
        except Exception:  # the store (rank 0) is gone: nothing left to tell
            return

    def silent_ranks(self) -> list[int] | None:
        """Ranks whose counter did not move over three beats; None when the store (rank 0) does not answer."""
        try:
            probe = self._client(timeout_s=5.0)
            before = [probe.add(f"{_KEY}{r}", 0) for r in range(self.world)]
            time.sleep(3 * self.interval_s)
            after = [probe.add(f"{_KEY}{r}", 0) for r in range(self.world)]
        except Exception:
            return None
        return [r for r in range(self.world) if before[r] == after[r] and r != self.rank]
