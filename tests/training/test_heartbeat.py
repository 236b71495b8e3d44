"""The heartbeat thread counts in the rendezvous store until it is stopped, and stop() waits for it."""
import time
from datetime import timedelta

import torch.distributed as dist

from longscan.training.heartbeat import _KEY, Heartbeat


def test_heartbeat_counts_then_stops_and_joins():
    master = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    beat = Heartbeat("127.0.0.1", master.port, rank=1, world_size=2, interval_s=0.02)
    assert beat.beating
    deadline = time.monotonic() + 10
    while master.add(f"{_KEY}1", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert master.add(f"{_KEY}1", 0) >= 3
    beat.stop()
    assert beat.beating is False
    after = master.add(f"{_KEY}1", 0)
    time.sleep(0.1)
    assert master.add(f"{_KEY}1", 0) == after
