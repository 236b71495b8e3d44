"""Counters for what the SP collectives send, receive and wait for (read by the benchmarks).

Bytes are the payload each rank hands to / takes from the network for the algorithm as written (a ring
all-reduce of n bytes over W ranks counts 2(W-1)/W·n each way). Wait time is host time spent blocked in
a collective: the communication cost on CPU/gloo, where ops block the host; on CUDA most waits are
stream dependencies that return at once, so compare end-to-end times there instead.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class CommStats:
    bytes_sent: int = 0
    bytes_recv: int = 0
    wait_s: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.bytes_recv = self.calls = 0
        self.wait_s = 0.0


STATS = CommStats()


def count(sent: int = 0, recv: int = 0) -> None:
    STATS.bytes_sent += sent
    STATS.bytes_recv += recv
    STATS.calls += 1


@contextmanager
def waiting():
    """Time the enclosed blocking communication into STATS.wait_s."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        STATS.wait_s += time.perf_counter() - t0


def nbytes(t) -> int:
    return t.numel() * t.element_size()
