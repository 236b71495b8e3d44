"""Named events the kernels emit as they run, for tests that count passes through the public surface.

    with trace.record() as events:
        backend.backward(...)
    assert [e.name for e in events] == ["bwd_dq", ...]

Outside ``record()`` an emit is one check of an empty list. Events name host-side launches (a pre-pass, a
state pass, a kernel), never what the kernels compute.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

_recorders: list[list] = []


@dataclasses.dataclass(frozen=True)
class Event:
    name: str
    info: dict[str, Any]


def emit(name: str, **info: Any) -> None:
    """Record an event in every open :func:`record` block (none open: nothing happens)."""
    for events in _recorders:
        events.append(Event(name, info))


@contextmanager
def record() -> Iterator[list[Event]]:
    """The events emitted inside the block, in order."""
    events: list[Event] = []
    _recorders.append(events)
    try:
        yield events
    finally:
        _recorders.remove(events)


def names(events: list[Event], prefix: str = "") -> list[str]:
    """The events' names (those starting with prefix)."""
    return [e.name for e in events if e.name.startswith(prefix)]
