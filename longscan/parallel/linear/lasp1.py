"""LASP-1: linear attention over an SP group by serial ring passing of the prefix state (the baseline).

LASP-1 is ZeCO's All-Scan with the state in one block: each hop waits for the whole state from the previous
segment's rank, combines it and passes the updated prefix on (one message a hop), so no hop starts before the
previous one has arrived. The same forward and backward as ZeCO, with ``n_blocks=1`` (exactly the messages and
arithmetic of a serial ring).
"""
from __future__ import annotations

from longscan.parallel.linear.common import LinearSPMethod, run_method
from longscan.parallel.linear.zeco import zeco_backward, zeco_forward

LASP1 = LinearSPMethod("lasp1", zeco_forward, zeco_backward, uses_blocks=False)


def lasp1_linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                           output_final_state=False, group=None, layout="contiguous", backend="auto",
                           overlap=False, options=None):
    """Linear attention on this rank's shard with LASP-1 ring passing. See ``longscan.parallel.linear_attention``."""
    return run_method(LASP1, q, k, v, g, g_gamma, scale, initial_state, output_final_state, group, layout, backend,
                      1, overlap, options)
