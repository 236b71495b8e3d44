"""ZeCO: linear attention over an SP group with the All-Scan collective.

forward:  local state S_loc of each segment (state-only pass) -> All-Scan of (S_loc, decay), pipelined in K
          blocks -> the output pass from the prefix (default, overlap=False); with overlap=True the scan
          runs on a side stream beside the zero-prefix output pass, then o += prefix term (off CUDA
          nothing can overlap: one local pass gives output and state, then the scan; ``local_pass``).
backward: gradient of each segment's entering state from its outputs -> reverse All-Scan, on a side
          stream beside the local backward's dq kernel (which needs P, not R) -> the rest of the local
          backward with (entering state P, gradient R of the leaving state).
"""
from __future__ import annotations

from longscan.distributed.all_scan import all_scan
from longscan.parallel.linear.common import (LinearSPMethod, all_reduce_sum, broadcast_from, local_backward,
                                             local_pass, merge, prefix_grads, reverse_beside_dq, run_method,
                                             segment_inputs)


def zeco_forward(sp, q, k, v, g, g_gamma, initial_state, output_final_state, keep, extra=None):
    """-> (o `[B, T, H, V]`, final state `[B, H, K, V]` or None, P `[n_local, B, H, K, V]`, record)."""
    qs, ks, vs, gs, _ = segment_inputs(sp, q, k, v, g)
    o, (P, last), record = local_pass(sp, qs, ks, vs, gs, g_gamma,
                                      lambda S, a: all_scan(S, a, sp.group, sp.layout, sp.n_blocks, initial_state),
                                      keep, extra)
    final = broadcast_from(last, sp.last_owner, P[0], sp) if output_final_state else None
    return merge(o, sp.n_local), final, P, record


def zeco_backward(sp, q, k, v, g, g_gamma, P, do, dfinal, record, dP_out=None):
    """-> (dq, dk, dv, dgate, dh0, R)."""
    dP, logd, qdo = prefix_grads(sp, q, g, g_gamma, do, record)
    if dP_out is not None:
        dP = dP + dP_out.to(dP.dtype)
    # Every rank returned the final state, so its gradient is the sum of every rank's copy's gradient.
    dN = all_reduce_sum(dfinal.to(dP.dtype), sp) if dfinal is not None else None
    R = reverse_beside_dq(q.device, lambda: all_scan(dP, logd, sp.group, sp.layout, sp.n_blocks, dN,
                                                     reverse=True)[0])
    return local_backward(sp, q, k, v, g, g_gamma, P, do, R, qdo, record)


ZECO = LinearSPMethod("zeco", zeco_forward, zeco_backward, uses_blocks=True)


def zeco_linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                          output_final_state=False, group=None, layout="contiguous", backend="auto",
                          n_blocks=4, overlap=False, options=None):
    """Linear attention on this rank's shard with ZeCO's All-Scan. See ``longscan.parallel.linear_attention``."""
    return run_method(ZECO, q, k, v, g, g_gamma, scale, initial_state, output_final_state, group, layout, backend,
                      n_blocks, overlap, options)
