"""Ring point-to-point exchange for ring attention (communication only).

Each step every rank sends a set of tensors to the next rank of the ring and receives same-shaped
tensors from the previous one, asynchronously, so the caller can compute on what it already holds while
the next block travels:

    comm = RingComm(group)
    nxt = comm.send_recv([k, v])   # queue: send k, v to rank+1; receive into nxt from rank-1
    comm.commit()                  # launch (torch.distributed.batch_isend_irecv)
    ...compute on k, v...
    comm.wait()                    # nxt now holds rank-1's k, v

Bytes sent/received and the host time blocked in ``wait`` go to ``longscan.distributed.stats.STATS``,
the counters every SP collective reports to (read by the benchmarks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from longscan.distributed.stats import count, nbytes, waiting


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
        tensors = [t.contiguous() for t in tensors]   # P2P needs dense buffers, on both ends
        recv = [torch.empty_like(t) for t in tensors] if recv is None else recv
        for t, r in zip(tensors, recv):
            self._ops.append(dist.P2POp(dist.isend, t, self.send_rank, self.group))
            self._ops.append(dist.P2POp(dist.irecv, r, self.recv_rank, self.group))
            count(sent=nbytes(t), recv=nbytes(r), kind="ring_p2p")
        return recv

    def commit(self) -> None:
        """Launch every queued send/receive at once."""
        if not self._ops:
            raise RuntimeError("RingComm: nothing queued to commit")
        self._reqs = dist.batch_isend_irecv(self._ops)
        self._ops = []

    def wait(self) -> None:
        """Block until the launched exchange has completed (time spent here goes to STATS.wait_s)."""
        if self._reqs is None:
            raise RuntimeError("RingComm: wait() without commit()")
        with waiting("ring_p2p"):
            for req in self._reqs:
                req.wait()
        self._reqs = None
