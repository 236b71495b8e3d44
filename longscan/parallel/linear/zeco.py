"""ZeCO: linear attention over an SP group with the All-Scan collective.

forward:  local state S_loc of each segment (state-only pass) -> All-Scan of (S_loc, decay), pipelined in K
          blocks -> the local output pass from the entering state. Overlapped (the default) in groups of
          heads: one group's All-Scan runs on a side stream beside the next group's state pass and its own
          group's output pass (``local_pass`` has the schedules).
backward: gradient of each segment's entering state from its outputs -> reverse All-Scan -> the local
          backward with (entering state P, gradient R of the leaving state), in the same groups
          (``sp_backward``).
"""
from __future__ import annotations

from longscan.distributed.all_scan import all_scan
from longscan.parallel.linear.common import (SPLinearAttentionFunction, all_reduce_sum, broadcast_from, heads_of,
                                             local_pass, make_context, merge, segment_inputs, sp_backward)


def zeco_forward(sp, q, k, v, g, g_gamma, initial_state, output_final_state):
    """-> (o `[B, T, H, V]`, final state `[B, H, K, V]` or None, P `[n_local, B, H, K, V]`)."""
    qs, ks, vs, gs, _ = segment_inputs(sp, q, k, v, g)
    o, (P, last) = local_pass(sp, qs, ks, vs, gs, g_gamma, lambda S, a, h: all_scan(
        S, a, sp.group, sp.layout, sp.n_blocks, heads_of(initial_state, h, 1)))
    final = broadcast_from(last, sp.last_owner, P[0], sp) if output_final_state else None
    return merge(o, sp.n_local), final, P


def zeco_backward(sp, q, k, v, g, g_gamma, P, do, dfinal):
    """-> (dq, dk, dv, dgate, dh0)."""
    # Every rank returned the final state, so its gradient is the sum of every rank's copy's gradient.
    dN = all_reduce_sum(dfinal.clone(), sp) if dfinal is not None else None
    return sp_backward(sp, q, k, v, g, g_gamma, P, do, lambda dP, a, h: all_scan(
        dP, a, sp.group, sp.layout, sp.n_blocks, heads_of(dN, h, 1), reverse=True)[0])


def zeco_linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                          output_final_state=False, group=None, layout="contiguous", backend="auto",
                          n_blocks=4, overlap=True):
    """Linear attention on this rank's shard with ZeCO's All-Scan. See ``longscan.parallel.linear_attention``."""
    sp = make_context(q, k, v, g, g_gamma, scale, initial_state, "zeco", group, layout, backend, n_blocks,
                      overlap)
    return SPLinearAttentionFunction.apply(zeco_forward, zeco_backward, sp, q, k, v, g, g_gamma,
                                           initial_state, output_final_state)
