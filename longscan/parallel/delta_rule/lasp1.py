"""LASP-1 for the delta rule: the serial ring, one whole carry `[K, V]` a hop (the baseline).

The affine chain scan of ``zeco`` with one V block: no hop starts before the previous one has arrived.
"""
from __future__ import annotations

from longscan.parallel.delta_rule.common import delta_rule_sp, make_context
from longscan.parallel.delta_rule.zeco import ChainScan


def lasp1_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, group=None,
                     layout="contiguous", backend="auto", options=None, transition="matrix"):
    """The delta rule on this rank's shard with LASP-1 ring passing. See ``delta_rule_attention``."""
    sp = make_context(q, k, v, beta, g, scale, initial_state, output_final_state, "lasp1", group, layout, backend, 1,
                      options, transition)
    return delta_rule_sp(ChainScan(1), sp, q, k, v, beta, g, initial_state, output_final_state)
