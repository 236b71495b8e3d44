"""Pieces shared by the softmax SP methods: which (query piece, key piece) blocks to compute, and running them.

Layouts cut the global sequence into segments ("pieces": W of length T for contiguous, 2W of T/2 for
zigzag, ``longscan.distributed.layouts``). Causal attention between a query piece a and a key piece b is
decided at the level of pieces: b < a every key is visible ("full"), b == a it is the diagonal block
("causal", diagonal-aligned), b > a nothing is visible and the pair is skipped.

With packed documents (``cu_seqlens``) pairs in which no query shares a document with any key are skipped
too (``longscan.distributed.documents.visible_pieces``), and every kernel call gets the document ids of its
queries and keys (:class:`SPDocuments`).
"""
from __future__ import annotations

from typing import Optional

import torch

from longscan.distributed.documents import cached_on, document_ids, to_device, visible_pieces
from longscan.distributed.layouts import num_segments, segment_ids
from longscan.kernels.softmax_attention import (BlockDocs, block_backward, block_forward, compute_dtype,
                                                merge_into)


class SPDocuments:
    """Packed documents as the SP methods use them for one call shape: the document id of every global token (int32,
    moved to the inputs' device once), the visible piece pairs, and each rank's local ids, made on first use
    from views of the global ids (a ring asks for its own rank's at every step)."""

    def __init__(self, ids_cpu: torch.Tensor, visible: frozenset, world: int, layout: str, device):
        self.visible = visible          # global (query piece, key piece) pairs with a visible key
        self.world, self.layout = world, layout
        self.ids = to_device(ids_cpu.to(torch.int32), device)   # [T_global], non-decreasing
        self._local: dict[int, torch.Tensor] = {}

    def of_rank(self, rank: int, local_len: int) -> torch.Tensor:
        """Document ids of rank ``rank``'s local tokens, in local order, on the inputs' device."""
        if rank not in self._local:
            segs = list(segment_ids(rank, self.world, self.layout))
            n = local_len // len(segs)
            if segs == list(range(segs[0], segs[0] + len(segs))):      # adjacent pieces: a view
                self._local[rank] = self.ids[segs[0] * n:(segs[-1] + 1) * n]
            else:
                self._local[rank] = torch.cat([self.ids[s * n:(s + 1) * n] for s in segs])
        return self._local[rank]


def sp_documents(cu_seqlens: Optional[torch.Tensor], local_len: int, world: int, layout: str, causal: bool,
                 device) -> Optional[SPDocuments]:
    """The :class:`SPDocuments` of a call (None without documents), built once per ``cu_seqlens`` tensor and
    call shape: every softmax layer of a step and the backward share it."""
    if cu_seqlens is None:
        return None
    n = num_segments(world, layout)
    total = local_len * world
    device = torch.device(device)

    def make():
        return SPDocuments(document_ids(cu_seqlens, total), visible_pieces(cu_seqlens, n, total // n, causal),
                           world, layout, device)
    return cached_on(cu_seqlens, ("sp_documents", local_len, world, layout, causal, device), make)


def block_plan(q_segs, k_segs, causal: bool, visible: Optional[frozenset] = None) -> list[tuple[slice, slice, str]]:
    """Kernel calls covering local query pieces ``q_segs`` against key pieces ``k_segs`` (global ids).

    Returns (query slot slice, key slot slice, mask) in units of pieces, adjacent pieces coalesced so a
    rank makes few, large calls: e.g. zigzag ring steps become one `T × T/2` or `T/2 × T` call.
    ``visible`` (packed documents): only these (query piece, key piece) pairs hold a visible key.
    """
    nq, nk = len(q_segs), len(k_segs)
    keep = (lambda a, b: True) if visible is None else (lambda a, b: (a, b) in visible)
    if not causal and visible is None:
        return [(slice(0, nq), slice(0, nk), "full")]
    if causal and list(q_segs) == list(k_segs) and list(q_segs) == sorted(q_segs):
        # Own pieces in increasing global order: causal over the local concatenation is exactly the
        # piece-level pattern (earlier own pieces full, same piece diagonal, later ones skipped).
        return [(slice(0, nq), slice(0, nk), "causal")]
    calls = []
    for a, qs in enumerate(q_segs):
        full = [b for b, ks in enumerate(k_segs) if (ks < qs or not causal) and keep(qs, ks)]
        start = None
        for i, b in enumerate(full):                       # contiguous runs of visible key slots
            start = b if start is None else start
            if i + 1 == len(full) or full[i + 1] != b + 1:
                calls.append((slice(a, a + 1), slice(start, b + 1), "full"))
                start = None
        if causal:
            calls += [(slice(a, a + 1), slice(b, b + 1), "causal") for b, ks in enumerate(k_segs) if ks == qs]
    # Neighbouring query slots with the same full key range become one call.
    merged = []
    for qsl, ksl, mask in calls:
        if merged and mask == "full" and merged[-1][2] == "full" and merged[-1][1] == ksl \
                and merged[-1][0].stop == qsl.start:
            merged[-1] = (slice(merged[-1][0].start, qsl.stop), ksl, mask)
        else:
            merged.append((qsl, ksl, mask))
    return merged


def token_slice(s: slice, seg_len: int) -> slice:
    return slice(s.start * seg_len, s.stop * seg_len)


def new_accumulators(q, dv_dim: int):
    """Running output `[B, T, Hq, Dv]` (zeros) and lse `[B, Hq, T]` (-inf) in the compute dtype."""
    dt = compute_dtype(q.dtype)
    b, t, h, _ = q.shape
    return q.new_zeros(b, t, h, dv_dim, dtype=dt), q.new_full((b, h, t), float("-inf"), dtype=dt)


def _docs(q_docs, k_docs, qs, ks) -> Optional[BlockDocs]:
    return None if q_docs is None else BlockDocs(q_docs[qs], k_docs[ks])


def forward_blocks(out, lse, q, k, v, plan, q_seg_len, k_seg_len, scale, backend, q_docs=None,
                   k_docs=None):
    """Run ``plan`` (from :func:`block_plan`) and merge each block into (out, lse) -> (out, lse).

    Given accumulators (compute dtype) are merged into in place. None: nothing seen yet; a first call
    covering every row then becomes (out, lse) as the kernel returned them (one call needs no merge, nor a
    float32 copy of o), widened to the compute dtype only if another block merges in.
    ``q_docs``/``k_docs``: document ids `[Tq]`/`[Tk]` of q and k (packed documents) or None.
    """
    dt = compute_dtype(q.dtype)
    for qs, ks, mask in plan:
        covers_all = qs.start == 0 and qs.stop * q_seg_len == q.shape[1]
        qs, ks = token_slice(qs, q_seg_len), token_slice(ks, k_seg_len)
        o_b, lse_b = block_forward(q[:, qs], k[:, ks], v[:, ks], scale, mask, backend,
                                   _docs(q_docs, k_docs, qs, ks))
        if out is None and covers_all:
            out, lse = o_b, lse_b
            continue
        if out is None:
            out, lse = new_accumulators(q, v.shape[-1])
        elif out.dtype != dt:
            out, lse = out.to(dt), lse.to(dt)
        merge_into(out, lse, o_b, lse_b, qs)
    return out, lse


def widened(acc, like: torch.Tensor) -> torch.Tensor:
    """``acc`` in the compute dtype of ``like`` (zeros shaped like it when acc is None)."""
    if acc is None:
        return zeros_acc(like)
    return acc if acc.dtype == compute_dtype(like.dtype) else acc.to(compute_dtype(like.dtype))


def accumulate(acc, part, rows: slice, like: torch.Tensor):
    """``acc[:, rows] += part`` -> acc, for gradients shaped like ``like``. acc None (nothing yet): ``part``
    itself when it covers every row (kept in its dtype: one call needs no float32 sum), else :func:`widened`."""
    if acc is None and rows.start == 0 and rows.stop == like.shape[1]:
        return part
    acc = widened(acc, like)
    acc[:, rows] += part
    return acc


def backward_blocks(dq, dk, dv, do, q, k, v, o, lse, plan, q_seg_len, k_seg_len, scale, backend,
                    q_docs=None, k_docs=None):
    """Add the block gradients of ``plan`` to dq, dk, dv -> (dq, dk, dv); given tensors in the compute dtype
    are added to in place, None ones start as in :func:`accumulate`."""
    for qs, ks, mask in plan:
        qs, ks = token_slice(qs, q_seg_len), token_slice(ks, k_seg_len)
        dq_b, dk_b, dv_b = block_backward(do[:, qs], q[:, qs], k[:, ks], v[:, ks], o[:, qs], lse[:, :, qs],
                                          scale, mask, backend, _docs(q_docs, k_docs, qs, ks))
        dq, dk, dv = accumulate(dq, dq_b, qs, q), accumulate(dk, dk_b, ks, k), accumulate(dv, dv_b, ks, v)
    return dq, dk, dv


def zeros_acc(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape, dtype=compute_dtype(x.dtype), device=x.device)
