"""Counters for what the SP collectives send, receive and wait for (read by the benchmarks and `longscan profile`).

Bytes are the payload each rank hands to / takes from the network for the algorithm as written (a ring
all-reduce of n bytes over W ranks counts 2(W-1)/W·n each way). Wait time is host time spent blocked in
a collective: the communication cost on CPU/gloo, where ops block the host; on CUDA most waits are
stream dependencies that return at once, so compare end-to-end times there instead.

Every call names its collective's ``kind`` (e.g. ``"all_scan"``). The totals always go to ``STATS``; when a
:class:`Recorder` is installed (``longscan profile``) each call is also handed to it, which attributes it to
a layer. With none installed a call costs two additions.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol


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


class Recorder(Protocol):
    """What receives each collective while profiling (longscan.observe.recorder.CommRecorder)."""

    def on_count(self, kind: str, sent: int, recv: int) -> None:
        """One call of a collective of ``kind`` that sends ``sent`` and receives ``recv`` bytes on this rank."""

    def wait_scope(self, kind: str):
        """A context manager around a blocking wait of ``kind`` (times it, names it in the trace)."""


_RECORDER: Recorder | None = None


def set_recorder(recorder: Recorder | None) -> Recorder | None:
    """Install ``recorder`` (None: remove it); returns the one it replaces."""
    global _RECORDER
    previous, _RECORDER = _RECORDER, recorder
    return previous


def count(sent: int = 0, recv: int = 0, kind: str = "other") -> None:
    STATS.bytes_sent += sent
    STATS.bytes_recv += recv
    STATS.calls += 1
    if _RECORDER is not None:
        _RECORDER.on_count(kind, sent, recv)


@contextmanager
def waiting(kind: str = "other"):
    """Time the enclosed blocking communication into STATS.wait_s (and the recorder's ``kind``)."""
    t0 = time.perf_counter()
    try:
        if _RECORDER is None:
            yield
        else:
            with _RECORDER.wait_scope(kind):
                yield
    finally:
        STATS.wait_s += time.perf_counter() - t0


def nbytes(t) -> int:
    return t.numel() * t.element_size()
