"""LASP-2 for the delta rule: one all-gather of every segment's affine map (M | S_loc) `[K, K + V]`.

forward:  every rank gathers all maps and scans them itself (the final state lands on every rank).
backward: one all-gather of the carries' gradients (with every rank's final-state gradient as an extra
          row); every rank scans them in reverse under the gathered Mᵀ, kept from the forward.
"""
from __future__ import annotations

import torch

from longscan.distributed.affine_scan import serial_affine_scan
from longscan.distributed.layouts import num_segments, segment_ids, segment_owner
from longscan.distributed.state_allgather import all_gather_states
from longscan.parallel.delta_rule.common import delta_rule_sp, make_context


def _global_order(gathered: torch.Tensor, sp) -> torch.Tensor:
    """Gathered `[W · per_rank, ...]` in rank order -> the global segments in sequence order."""
    per_rank = gathered.shape[0] // sp.world
    n = num_segments(sp.world, sp.layout)
    return torch.stack([gathered[r * per_rank + slot] for r, slot in
                        (segment_owner(j, sp.world, sp.layout) for j in range(n))])


def _mine(x: torch.Tensor, sp) -> torch.Tensor:
    return torch.stack([x[j] for j in segment_ids(sp.rank, sp.world, sp.layout)])


class GatherScan:
    def scan(self, sp, M, S, initial, output_final_state):
        K = M.shape[-1]
        gathered = _global_order(all_gather_states(torch.cat([M, S], dim=-1), sp.group), sp)
        Mg = gathered[..., :K].contiguous()
        carries, final = serial_affine_scan(Mg, gathered[..., K:], initial)
        return _mine(carries, sp), (final if output_final_state else None), Mg

    def scan_back(self, sp, M, dP, dN, Mg):
        extra = dN if dN is not None else torch.zeros_like(dP[0])
        gathered = all_gather_states(torch.cat([dP, extra.unsqueeze(0)]), sp.group)
        per_rank = sp.n_local + 1
        dN_sum = gathered[per_rank - 1::per_rank].sum(0)
        segs = gathered.view((sp.world, per_rank) + tuple(gathered.shape[1:]))[:, :-1].flatten(0, 1)
        R, first = serial_affine_scan(Mg.transpose(-1, -2), _global_order(segs, sp), dN_sum, reverse=True)
        return _mine(R, sp), (first if sp.rank == sp.first_owner else None)


def lasp2_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, group=None,
                     layout="contiguous", backend="auto", options=None, transition="matrix"):
    """The delta rule on this rank's shard with LASP-2's all-gather. See ``delta_rule_attention``."""
    sp = make_context(q, k, v, beta, g, scale, initial_state, output_final_state, "lasp2", group, layout, backend, 1,
                      options, transition)
    return delta_rule_sp(GatherScan(), sp, q, k, v, beta, g, initial_state, output_final_state)
