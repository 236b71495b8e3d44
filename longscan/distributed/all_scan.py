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
import torch.distributed as dist

from longscan.distributed.layouts import group_rank_size, num_segments, segment_owner
from longscan.distributed.stats import count, nbytes, waiting


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


def blocks(n: int, n_blocks: int) -> list[tuple[int, int]]:
    """n rows (or columns) cut into n_blocks contiguous (start, end) blocks, the first n % n_blocks one longer."""
    size, extra = divmod(n, n_blocks)
    ends = [(b + 1) * size + min(b + 1, extra) for b in range(n_blocks)]
    return list(zip([0] + ends[:-1], ends))


def global_rank(group, r: int) -> int:
    """The global rank of group rank r (what point-to-point calls take)."""
    return r if group is None else dist.get_global_rank(group, r)


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
    order = list(range(n))[::-1] if reverse else list(range(n))
    if world == 1:   # every segment is here: nothing to send, so nothing to pipeline
        return serial_scan(states, log_decays, initial, reverse)
    cuts = blocks(K, n_blocks)
    # Work K-major, `[n_local, K, B, H, V]`, so that a K block is one contiguous buffer: received in place,
    # combined by one kernel and sent without a copy.
    S = states.movedim(-2, 1).contiguous()
    decays = log_decays.exp().movedim(-1, 1).unsqueeze(-1).contiguous()      # [n_local, K, B, H, 1]
    init = None if initial is None else initial.to(S.dtype).movedim(-2, 0)
    carries = torch.empty_like(S)
    sends, last, local_out = [], None, None
    for pos, seg in enumerate(order):
        owner, slot = segment_owner(seg, world, layout)
        if owner != rank:
            continue
        src = segment_owner(order[pos - 1], world, layout)[0] if pos > 0 else None
        dst = segment_owner(order[pos + 1], world, layout)[0] if pos + 1 < n else None
        # Post every block's receive first, so blocks arrive while earlier ones are being combined.
        recvs = []
        if src is not None and src != rank:
            for b, (k0, k1) in enumerate(cuts):
                buf = carries[slot, k0:k1]
                recvs.append(dist.irecv(buf, global_rank(group, src), group=group, tag=order[pos - 1] * n_blocks + b))
                count(recv=nbytes(buf), kind="all_scan")
        elif src == rank:
            carries[slot] = local_out
        elif init is None:
            carries[slot] = 0
        else:
            carries[slot] = init
        out = torch.empty_like(S[slot])
        if dst is None or dst == rank:   # nothing to pass on: one kernel once every block is in
            with waiting("all_scan"):
                for work in recvs:
                    work.wait()
            torch.addcmul(S[slot], decays[slot], carries[slot], out=out)
        else:
            for b, (k0, k1) in enumerate(cuts):
                if recvs:
                    with waiting("all_scan"):
                        recvs[b].wait()
                torch.addcmul(S[slot, k0:k1], decays[slot, k0:k1], carries[slot, k0:k1], out=out[k0:k1])
                sends.append(dist.isend(out[k0:k1], global_rank(group, dst), group=group, tag=seg * n_blocks + b))
                count(sent=nbytes(out[k0:k1]), kind="all_scan")
        if dst is None:
            last = out.movedim(0, -2)
        local_out = out
    with waiting("all_scan"):
        for work in sends:
            work.wait()
    return carries.movedim(1, -2).contiguous(), last
