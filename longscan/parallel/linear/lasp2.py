"""LASP-2: linear attention over an SP group with one all-gather of fixed-size memory states.

forward:  local state S_loc and log decay of each segment -> one all-gather of both (one buffer, size
          independent of T) -> every rank scans the gathered states for its own prefixes (and the final
          state) -> the output pass from the prefix (default); with overlap=True the all-gather runs on a
          side stream beside the zero-prefix output pass on CUDA, then o += prefix term (``local_pass``).
backward: gradient of each segment's entering state, with the final-state gradient, in one all-gather ->
          every rank scans them in reverse (on a side stream beside the local backward's dq kernel) -> the
          rest of the local backward.
"""
from __future__ import annotations

import torch

from longscan.distributed.all_scan import serial_scan
from longscan.distributed.layouts import num_segments, segment_ids, segment_owner
from longscan.distributed.state_allgather import all_gather_states
from longscan.parallel.linear.common import (LinearSPMethod, local_backward, local_pass, merge, prefix_grads,
                                             reverse_beside_dq, run_method, segment_inputs)


def _global_order(gathered: torch.Tensor, sp) -> torch.Tensor:
    """Gathered `[W·(n_local + extra), ...]` in rank order -> the n global segments in sequence order."""
    per_rank = gathered.shape[0] // sp.world
    n = num_segments(sp.world, sp.layout)
    idx = [r * per_rank + slot for r, slot in (segment_owner(j, sp.world, sp.layout) for j in range(n))]
    return _take(gathered, idx)


def _mine(carries: torch.Tensor, sp) -> torch.Tensor:
    """The entries of ``carries`` `[n, ...]` (global order) for this rank's segments, in local order."""
    return _take(carries, segment_ids(sp.rank, sp.world, sp.layout))


def _take(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[idx] for a short list of ints, without the host-to-device copy of an index tensor: indexing a CUDA
    tensor with a list copies the list from pageable memory, which waits for the stream to drain."""
    if idx == list(range(x.shape[0])):
        return x
    return torch.stack([x[i] for i in idx])


def lasp2_forward(sp, q, k, v, g, g_gamma, initial_state, output_final_state, keep, extra=None):
    """-> (o `[B, T, H, V]`, final state `[B, H, K, V]` or None, P `[n_local, B, H, K, V]`, record)."""
    qs, ks, vs, gs, _ = segment_inputs(sp, q, k, v, g)

    def gather_and_scan(S, logd):
        # One buffer `[n_local, B, H, K, V + 1]`: the state with its log decay as an extra column.
        gathered = all_gather_states(torch.cat([S, logd.unsqueeze(-1)], dim=-1), sp.group)
        gathered = _global_order(gathered, sp)
        carries, final = serial_scan(gathered[..., :-1], gathered[..., -1], initial_state)
        return _mine(carries, sp), final

    o, (P, final), record = local_pass(sp, qs, ks, vs, gs, g_gamma, gather_and_scan, keep, extra)
    return merge(o, sp.n_local), (final if output_final_state else None), P, record


def lasp2_backward(sp, q, k, v, g, g_gamma, P, do, dfinal, record, dP_out=None):
    """-> (dq, dk, dv, dgate, dh0, R)."""
    dP, logd, qdo = prefix_grads(sp, q, g, g_gamma, do, record)
    if dP_out is not None:
        dP = dP + dP_out.to(dP.dtype)

    def gather_and_scan_back():
        # Rows: this rank's segments, then its final-state gradient (the global one is the sum over ranks).
        extra = dfinal.to(dP.dtype) if dfinal is not None else torch.zeros_like(dP[0])
        rows = torch.cat([dP, extra.unsqueeze(0)], dim=0)
        decays = torch.cat([logd, torch.zeros_like(logd[:1])], dim=0)
        buf = torch.cat([rows, decays.unsqueeze(-1)], dim=-1)
        gathered = all_gather_states(buf, sp.group)
        per_rank = sp.n_local + 1
        dN = gathered[per_rank - 1::per_rank, ..., :-1].sum(0)
        segs = gathered.view((sp.world, per_rank) + tuple(gathered.shape[1:]))[:, :-1].flatten(0, 1)
        segs = _global_order(segs, sp)
        R, _ = serial_scan(segs[..., :-1], segs[..., -1], dN, reverse=True)
        return _mine(R, sp)

    return local_backward(sp, q, k, v, g, g_gamma, P, do, reverse_beside_dq(q.device, gather_and_scan_back), qdo,
                          record)


LASP2 = LinearSPMethod("lasp2", lasp2_forward, lasp2_backward)


def lasp2_linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                           output_final_state=False, group=None, layout="contiguous", backend="auto",
                           overlap=False, options=None):
    """Linear attention on this rank's shard with LASP-2. See ``longscan.parallel.linear_attention``."""
    return run_method(LASP2, q, k, v, g, g_gamma, scale, initial_state, output_final_state, group, layout, backend,
                      1, overlap, options)
