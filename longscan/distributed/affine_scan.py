"""The All-Scan of affine segment maps: the delta rule's carries along the global segment order.

Every global segment j maps the state entering it to the state leaving it, S ↦ M_j S + S_j, with M_j
`[B, H, K, K]` and S_j `[B, H, K, V]`. The carry entering segment j is
    C_0 = initial,    C_{j+1} = M_j C_j + S_j
and ``reverse=True`` runs the same recurrence from the last segment to the first (the backward pass, with
the caller's transitions transposed: dC_j = M_jᵀ dC_{j+1} + dP_j).

Only carries travel: each rank applies its own M_j. A transition acts on the K rows of every column alike,
so every block of V columns is its own scan; the carry is cut along V into ``n_blocks`` blocks, each sent
to the next rank as soon as it is combined, and the hops of consecutive blocks overlap, as in the diagonal
All-Scan (``all_scan``) with K blocks. Each hop sends one `[B, H, K, V]` carry, the diagonal case's volume.

With the zigzag layout each rank holds two segments and the chain visits ranks 0 → W-1 and back W-1 → 0.
"""
from __future__ import annotations

import torch

from longscan.distributed.chain import chain_scan
from longscan.distributed.layouts import group_rank_size, num_segments


def serial_affine_scan(transitions: torch.Tensor, states: torch.Tensor, initial: torch.Tensor | None = None,
                       reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan on one process. transitions `[n, B, H, K, K]`, states `[n, B, H, K, V]`.

    -> (carries `[n, B, H, K, V]` entering each segment in scan order, the carry leaving the last one).
    Autograd can run through it (the SP operators' LASP-2 does not: it has its own backward)."""
    n = states.shape[0]
    carries = []
    carry = None if initial is None else initial.to(states.dtype)
    for j in (reversed(range(n)) if reverse else range(n)):
        carries.append(torch.zeros_like(states[j]) if carry is None else carry)
        # a zero carry: the next one is the segment's own state (a copy: it may be handed out)
        carry = states[j].clone() if carry is None else transitions[j] @ carry + states[j]
    if reverse:
        carries.reverse()
    return torch.stack(carries), carry


def affine_all_scan(transitions: torch.Tensor, states: torch.Tensor, group=None, layout: str = "contiguous",
                    n_blocks: int = 4, initial: torch.Tensor | None = None, reverse: bool = False):
    """The affine All-Scan over an SP group.

    transitions `[n_local, B, H, K, K]` and states `[n_local, B, H, K, V]` of this rank's segments in local
    order (1 for contiguous, 2 for zigzag: ``layouts.segment_ids``); ``initial`` `[B, H, K, V]` enters the
    scan's first segment (global segment 0, or the last one when ``reverse``), zeros when None.

    -> (carries `[n_local, B, H, K, V]` entering each local segment, last), ``last`` the carry leaving the
    scan's final segment on the rank that owns it and None on every other rank. No autograd.
    """
    rank, world = group_rank_size(group)
    n = num_segments(world, layout)
    n_local = n // world
    if states.dim() != 5 or states.shape[0] != n_local:
        raise ValueError(f"states must be [n_local={n_local}, B, H, K, V], got {tuple(states.shape)}")
    K, V = states.shape[-2:]
    if tuple(transitions.shape) != tuple(states.shape[:-1]) + (K,):
        raise ValueError(f"transitions must be {tuple(states.shape[:-1]) + (K,)}, got {tuple(transitions.shape)}")
    if not isinstance(n_blocks, int) or not 1 <= n_blocks <= V:
        raise ValueError(f"n_blocks must be an int in [1, V={V}], got {n_blocks!r}")
    if world == 1:
        return serial_affine_scan(transitions, states, initial, reverse)
    # V-major `[n_local, V, B, H, K]`: a block of columns is one contiguous buffer
    S = states.movedim(-1, 1).contiguous()
    init = None if initial is None else initial.to(S.dtype).movedim(-1, 0)
    M = transitions.to(S.dtype)

    def combine(slot, v0, v1, carry, out):
        torch.add(torch.einsum("bhij,vbhj->vbhi", M[slot], carry), S[slot, v0:v1], out=out)
    carries, last = chain_scan(S, n_blocks, combine, group, layout, init, reverse, kind="all_scan")
    return carries.movedim(1, -1).contiguous(), None if last is None else last.movedim(0, -1).contiguous()
