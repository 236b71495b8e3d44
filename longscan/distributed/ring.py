"""Ring point-to-point exchange for ring attention (communication only).

Each step every rank sends a set of tensors to the next rank of the ring and receives same-shaped
tensors from the previous one, asynchronously, so the caller can compute on what it already holds while
the next block travels:

    comm = RingComm(group)
    nxt = comm.send_recv([k, v])   # queue: send k, v to rank+1; receive into nxt from rank-1
    comm.commit()                  # launch (torch.distributed.batch_isend_irecv)
    ...compute on k, v...
    comm.wait()                    # nxt now holds rank-1's k, v

``COMM_STATS`` counts bytes sent/received by this process and the seconds spent blocked in ``wait``
(host clock), for the benchmarks; the SP collectives of the other softmax methods add to it too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Per-process communication counters (reset by the benchmark between measurements)."""
    bytes_sent: int = 0
    bytes_recv: int = 0
    wait_s: float = 0.0

    def reset(self) -> None:
        self.bytes_sent, self.bytes_recv, self.wait_s = 0, 0, 0.0

    def add(self, sent: int = 0, recv: int = 0, wait_s: float = 0.0) -> None:
        self.bytes_sent += sent
        self.bytes_recv += recv
        self.wait_s += wait_s


COMM_STATS = CommStats()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class RingComm:
    """Asynchronous send-to-next / receive-from-previous along the ranks of ``group``."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # P2P ops address global ranks, not ranks inside the group.
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.send_rank = to_global((self.rank + 1) % self.world_size)
        self.recv_rank = to_global((self.rank - 1) % self.world_size)
        self._ops: list = []
        self._reqs: list | None = None

    def send_recv(self, tensors, recv=None) -> list[torch.Tensor]:
        """Queue sending ``tensors`` to the next rank and receiving their like from the previous one.

        ``recv`` optionally gives the receive buffers (reused across steps); returns them.
        """
        if self._reqs is not None:
            raise RuntimeError("RingComm: wait() for the previous exchange before queuing another")
        recv = [torch.empty_like(t) for t in tensors] if recv is None else recv
        for t, r in zip(tensors, recv):
            t = t.contiguous()
            self._ops.append(dist.P2POp(dist.isend, t, self.send_rank, self.group))
            self._ops.append(dist.P2POp(dist.irecv, r, self.recv_rank, self.group))
            COMM_STATS.add(sent=nbytes(t), recv=nbytes(r))
        return recv

    def commit(self) -> None:
        """Launch every queued send/receive at once."""
        if not self._ops:
            raise RuntimeError("RingComm: nothing queued to commit")
        self._reqs = dist.batch_isend_irecv(self._ops)
        self._ops = []

    def wait(self) -> None:
        """Block until the launched exchange has completed (time spent here goes to COMM_STATS.wait_s)."""
        if self._reqs is None:
            raise RuntimeError("RingComm: wait() without commit()")
        t0 = time.perf_counter()
        for req in self._reqs:
            req.wait()
        COMM_STATS.add(wait_s=time.perf_counter() - t0)
        self._reqs = None
