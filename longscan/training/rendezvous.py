"""Rendezvous of the ranks of `longscan train` across nodes, with feedback while it waits.

Global rank 0 hosts a TCPStore at MASTER_ADDR:MASTER_PORT; every rank connects and registers its host.
While a rank waits (for the store to come up, or for peers to register) its node's first rank prints,
every ``report_every_s``, whom it waits for, at which address and for how long; after ``timeout_s`` the
rendezvous fails with RendezvousError instead of waiting silently.
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

_PREFIX = "longscan/rdzv/"


class RendezvousError(RuntimeError):
    """Not every rank joined in time; the message names the missing ranks and the address."""


@dataclass(frozen=True)
class RendezvousOptions:
    """Where and how long the ranks of one run meet."""
    master_addr: str
    master_port: int
    rank: int
    world_size: int
    local_rank: int
    nproc_per_node: int
    timeout_s: float = 900.0
    """Give up after this many seconds without every rank."""
    report_every_s: float = 10.0
    """Say what we are waiting for this often."""

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError(f"rendezvous timeout must be > 0 seconds, got {self.timeout_s}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK {self.rank} is not in [0, WORLD_SIZE={self.world_size})")


def _missing_nodes(missing: list[int], per_node: int) -> str:
    nodes = sorted({r // per_node for r in missing})
    return f"ranks {_ranges(missing)} (node rank {_ranges(nodes)})"


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def rendezvous(o: RendezvousOptions) -> dist.TCPStore:
    """Meet every rank; returns the store to build the process group on. Raises RendezvousError."""
    where = f"{o.master_addr}:{o.master_port}"
    t0 = time.monotonic()
    state = {"what": f"the rendezvous store of rank 0 at {where}"}
    done = threading.Event()

    def report() -> None:
        while not done.wait(o.report_every_s):
            print(f"longscan train: node {o.rank // o.nproc_per_node} (host {socket.gethostname()}) waiting for "
                  f"{state['what']}: {time.monotonic() - t0:.0f} s of the {o.timeout_s:.0f} s rendezvous timeout",
                  file=sys.stderr, flush=True)

    if o.local_rank == 0:
        threading.Thread(target=report, name="longscan-rendezvous-report", daemon=True).start()
    try:
        try:
            store = dist.TCPStore(o.master_addr, o.master_port, o.world_size, is_master=o.rank == 0,
                                  timeout=timedelta(seconds=o.timeout_s), wait_for_workers=False)
        except Exception as e:  # the store's own error says little: say what we waited for
            raise RendezvousError(f"rank {o.rank} could not reach rank 0's rendezvous store at {where} within "
                                  f"{o.timeout_s:.0f} s ({type(e).__name__}: {str(e)[:300]}); is node 0 started, "
                                  "and are --master-addr/--master-port right and reachable?") from e
        store.set(f"{_PREFIX}rank{o.rank}", socket.gethostname())
        store.add(f"{_PREFIX}joined", 1)
        next_look = 0.0
        while store.add(f"{_PREFIX}joined", 0) < o.world_size:  # one counter read per poll, whatever the world
            now = time.monotonic()
            late = now - t0 > o.timeout_s
            if late or (o.local_rank == 0 and now >= next_look):  # who is missing: one key per rank, so rarely
                missing = [r for r in range(o.world_size) if not store.check([f"{_PREFIX}rank{r}"])]
                state["what"] = (f"{len(missing)} of {o.world_size} ranks to join at {where}: "
                                 f"{_missing_nodes(missing, o.nproc_per_node)}")
                next_look = now + o.report_every_s / 2
                if late:
                    raise RendezvousError(f"rendezvous at {where} timed out after {o.timeout_s:.0f} s: "
                                          f"{_missing_nodes(missing, o.nproc_per_node)} never joined; start every "
                                          "node with the same --nnodes, --master-addr and --master-port")
            time.sleep(0.2)
        return store
    finally:
        done.set()
