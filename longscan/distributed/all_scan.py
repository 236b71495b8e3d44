"""ZeCO's All-Scan: a chain scan of diagonal-decay states along the global segment order.

Every global segment j has a state S_j `[B, H, K, V]` and a log decay a_j `[B, H, K]`. The carry entering
segment j is
    C_0 = initial,    C_{j+1} = exp(a_j) ⊙ C_j + S_j        (decay broadcast over V)
and ``reverse=True`` runs the same recurrence from the last segment to the first (the backward pass).

Because the decay is diagonal over K, every row block of the state is its own scan. The state is cut
along K into ``n_blocks`` blocks and each block is sent to the next rank as soon as it is combined, so
the hops of consecutive blocks overlap (latency ≈ (hops + n_blocks - 1) block transfers, not
hops × whole-state transfers).

With the zigzag layout each rank holds two segments and the chain visits ranks 0 → W-1 and back W-1 → 0.
"""
from __future__ import annotations

import torch

from longscan.distributed.chain import chain_scan
from longscan.distributed.layouts import group_rank_size, num_segments


def serial_scan(states: torch.Tensor, log_decays: torch.Tensor, initial: torch.Tensor | None = None,
                reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan on one process. states `[n, B, H, K, V]`, log_decays `[n, B, H, K]`.

    -> (carries `[n, B, H, K, V]` entering each segment in scan order, the carry leaving the last one).
    Two kernels a segment (one exp, one fused multiply-add): on a GPU the host's launches, not the
    arithmetic, are what this costs.
    """
    n = states.shape[0]
    carries = torch.empty_like(states)
    carry = None if initial is None else initial.to(states.dtype)
    for j in (reversed(range(n)) if reverse else range(n)):
        if carry is None:               # a zero carry: the next one is the segment's own state
            carries[j].zero_()
            carry = states[j]
        else:
            carries[j].copy_(carry)
            carry = torch.addcmul(states[j], log_decays[j].exp().unsqueeze(-1), carry)
    if n == 1 and initial is None:   # a fresh tensor, not a view of the caller's states (it may be handed out)
        carry = carry.clone()
    return carries, carry


def all_scan(states: torch.Tensor, log_decays: torch.Tensor, group=None, layout: str = "contiguous",
             n_blocks: int = 4, initial: torch.Tensor | None = None, reverse: bool = False):
    """The All-Scan over an SP group.

    states `[n_local, B, H, K, V]` and log_decays `[n_local, B, H, K]` of this rank's segments in local
    order (1 for contiguous, 2 for zigzag: see ``layouts.segment_ids``); ``initial`` `[B, H, K, V]` enters
    the first segment of the scan (global segment 0, or the last one when ``reverse``), zeros when None.

    -> (carries `[n_local, B, H, K, V]` entering each local segment, last) where ``last`` is the carry
    leaving the scan's final segment on the rank that owns it and None on every other rank.
    """
    rank, world = group_rank_size(group)
    n = num_segments(world, layout)
    n_local = n // world
    if states.dim() != 5 or states.shape[0] != n_local:
        raise ValueError(f"states must be [n_local={n_local}, B, H, K, V], got {tuple(states.shape)}")
    if tuple(log_decays.shape) != tuple(states.shape[:-1]):
        raise ValueError(f"log_decays must be {tuple(states.shape[:-1])}, got {tuple(log_decays.shape)}")
    K = states.shape[-2]
    if not 1 <= n_blocks <= K:
        raise ValueError(f"n_blocks must be in [1, K={K}], got {n_blocks}")
    if world == 1:   # every segment is here: nothing to send, so nothing to pipeline
        return serial_scan(states, log_decays, initial, reverse)
    # K-major `[n_local, K, B, H, V]`: a K block is one contiguous buffer
    S = states.movedim(-2, 1).contiguous()
    decays = log_decays.exp().movedim(-1, 1).unsqueeze(-1).contiguous()      # [n_local, K, B, H, 1]
    init = None if initial is None else initial.to(S.dtype).movedim(-2, 0)

    def combine(slot, k0, k1, carry, out):
        torch.addcmul(S[slot, k0:k1], decays[slot, k0:k1], carry, out=out)
    carries, last = chain_scan(S, n_blocks, combine, group, layout, init, reverse, kind="all_scan")
    return carries.movedim(1, -2).contiguous(), None if last is None else last.movedim(0, -2)
