"""LASP-1: linear attention over an SP group by serial ring passing of the prefix state (the baseline).

forward:  the local states -> wait for the prefix from the previous segment's rank, pass the updated
          prefix on (whole state, one message a hop) -> the outputs (see ``local_pass`` for the schedules).
backward: the reverse ring of state gradients (beside the local backward's dq kernel), then the rest of
          the local backward.
"""
from __future__ import annotations

from longscan.distributed.all_scan import all_scan
from longscan.parallel.linear.common import (SPLinearAttentionFunction, all_reduce_sum, broadcast_from,
                                             local_backward, local_pass, make_context, merge, prefix_grads,
                                             reverse_beside_dq, segment_inputs)


def lasp1_forward(sp, q, k, v, g, g_gamma, initial_state, output_final_state):
    """-> (o `[B, T, H, V]`, final state `[B, H, K, V]` or None, P `[n_local, B, H, K, V]`)."""
    qs, ks, vs, gs, _ = segment_inputs(sp, q, k, v, g)
    # serial ring of whole states (one block): no hop starts before the previous one has arrived
    o, (P, last) = local_pass(sp, qs, ks, vs, gs, g_gamma,
                              lambda S, a: all_scan(S, a, sp.group, sp.layout, 1, initial_state))
    final = broadcast_from(last, sp.last_owner, P[0], sp) if output_final_state else None
    return merge(o, sp.n_local), final, P


def lasp1_backward(sp, q, k, v, g, g_gamma, P, do, dfinal):
    """-> (dq, dk, dv, dgate, dh0)."""
    dP, logd, qdo = prefix_grads(sp, q, g, g_gamma, do)
    dN = all_reduce_sum(dfinal.to(dP.dtype), sp) if dfinal is not None else None
    R = reverse_beside_dq(q.device, lambda: all_scan(dP, logd, sp.group, sp.layout, 1, dN, reverse=True)[0])
    return local_backward(sp, q, k, v, g, g_gamma, P, do, R, qdo)


def lasp1_linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                           output_final_state=False, group=None, layout="contiguous", backend="auto",
                           overlap=False):
    """Linear attention on this rank's shard with LASP-1 ring passing. See ``longscan.parallel.linear_attention``."""
    sp = make_context(q, k, v, g, g_gamma, scale, initial_state, "lasp1", group, layout, backend, 1, overlap)
    return SPLinearAttentionFunction.apply(lasp1_forward, lasp1_backward, sp, q, k, v, g, g_gamma,
                                           initial_state, output_final_state)
