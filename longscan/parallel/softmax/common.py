"""Pieces shared by the softmax SP methods: which (query piece, key piece) blocks to compute, and running them.

Layouts cut the global sequence into segments ("pieces": W of length T for contiguous, 2W of T/2 for
zigzag, ``longscan.distributed.layouts``). Causal attention between a query piece a and a key piece b is
decided at the level of pieces: b < a every key is visible ("full"), b == a it is the diagonal block
("causal", diagonal-aligned), b > a nothing is visible and the pair is skipped.

With packed documents (``cu_seqlens``) pairs in which no query shares a document with any key are skipped
too, and a pair that shares some covers only the rows of the shared documents
(``longscan.distributed.documents.visible_blocks``); a call gets the document ids of its queries and keys
(:class:`SPDocuments`) only where two documents meet inside it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from longscan.distributed.documents import VisibleBlock, cached_on, document_ids, to_device, visible_blocks
from longscan.distributed.layouts import num_segments, segment_ids
from longscan.kernels.softmax_attention import (BlockDocs, block_backward, block_forward, compute_dtype,
                                                merge_into)


class SPDocuments:
    """Packed documents as the SP methods use them for one call shape: the document id of every global token (int32,
    moved to the inputs' device once), the visible blocks of piece pairs, and each rank's local ids, made on first use
    from views of the global ids (a ring asks for its own rank's at every step)."""

    def __init__(self, ids_cpu: torch.Tensor, blocks: dict[tuple[int, int], VisibleBlock], world: int, layout: str,
                 device):
        self.blocks = blocks            # global (query piece, key piece) -> the rows holding its visible keys
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
        return SPDocuments(document_ids(cu_seqlens, total), visible_blocks(cu_seqlens, n, total // n, causal),
                           world, layout, device)
    return cached_on(cu_seqlens, ("sp_documents", local_len, world, layout, causal, device), make)


class Call(NamedTuple):
    """One kernel call of a plan: local query rows ``q`` against key rows ``k`` (token slices), the ``mask``
    ("full" or "causal", diagonal-aligned), and whether it needs the document ids (two documents meet in it)."""
    q: slice
    k: slice
    mask: str
    docs: bool = False


def block_plan(q_segs, k_segs, causal: bool, seg_len: int,
               blocks: Optional[dict[tuple[int, int], VisibleBlock]] = None) -> list[Call]:
    """Kernel calls covering local query pieces ``q_segs`` against key pieces ``k_segs`` (global ids), each piece
    ``seg_len`` tokens, in local token offsets.

    Adjacent pieces are coalesced so a rank makes few, large calls: e.g. zigzag ring steps become one `T × T/2`
    or `T/2 × T` call. ``blocks`` (packed documents, :func:`visible_blocks`): only those pairs hold a visible
    key, and a call covers only the rectangle of a pair that does (a neighbour's piece usually shares one
    document with a local one: its rows, not the pieces, and without a document mask).
    """
    nq, nk = len(q_segs), len(k_segs)
    rows = lambda slot, span: slice(slot * seg_len + span[0], slot * seg_len + span[1])  # noqa: E731
    whole = (0, seg_len)
    if not causal and blocks is None:
        return [Call(slice(0, nq * seg_len), slice(0, nk * seg_len), "full")]
    if causal and list(q_segs) == list(k_segs) and list(q_segs) == sorted(q_segs):
        # Own pieces in increasing global order: causal over the local concatenation is exactly the
        # piece-level pattern (earlier own pieces full, same piece diagonal, later ones skipped).
        return [Call(slice(0, nq * seg_len), slice(0, nk * seg_len), "causal",
                     blocks is not None and not _one_document(q_segs, blocks, whole))]
    calls = []
    for a, qs in enumerate(q_segs):
        run = None                                         # a run of contiguous key rows with the same query rows
        for b, ks in enumerate(k_segs):
            blk = None
            if not causal or ks < qs:
                blk = VisibleBlock(whole, whole, False) if blocks is None else blocks.get((qs, ks))
            if blk is None:
                _flush(calls, run)
                run = None
                continue
            c = Call(rows(a, blk.q), rows(b, blk.k), "full", blk.docs)
            if run is not None and run.q == c.q and run.k.stop == c.k.start:
                run = Call(run.q, slice(run.k.start, c.k.stop), "full", run.docs or c.docs)
            else:
                _flush(calls, run)
                run = c
        _flush(calls, run)
        if causal:
            calls += [Call(rows(a, whole), rows(b, whole), "causal", blocks is not None and blocks[(qs, ks)].docs)
                      for b, ks in enumerate(k_segs) if ks == qs and (blocks is None or (qs, ks) in blocks)]
    # Neighbouring query rows with the same full key rows become one call.
    merged = []
    for c in calls:
        m = merged[-1] if merged else None
        if m is not None and c.mask == m.mask == "full" and m.k == c.k and m.q.stop == c.q.start:
            merged[-1] = Call(slice(m.q.start, c.q.stop), m.k, "full", m.docs or c.docs)
        else:
            merged.append(c)
    return merged


def _flush(calls: list, run: Optional[Call]) -> None:
    if run is not None:
        calls.append(run)


def _one_document(segs, blocks, whole) -> bool:
    """Whether the causal mask over these own pieces' concatenation is already the documents' mask: each piece
    within one document, and every earlier piece wholly visible to every later one."""
    return not any(blocks[(a, a)].docs for a in segs) and all(
        (a, b) in blocks and blocks[(a, b)] == VisibleBlock(whole, whole, False)
        for i, a in enumerate(segs) for b in segs[:i])


def new_accumulators(q, dv_dim: int):
    """Running output `[B, T, Hq, Dv]` (zeros) and lse `[B, Hq, T]` (-inf) in the compute dtype."""
    dt = compute_dtype(q.dtype)
    b, t, h, _ = q.shape
    return q.new_zeros(b, t, h, dv_dim, dtype=dt), q.new_full((b, h, t), float("-inf"), dtype=dt)


def _docs(q_docs, k_docs, call: Call) -> Optional[BlockDocs]:
    return BlockDocs(q_docs[call.q], k_docs[call.k]) if call.docs else None


def forward_blocks(out, lse, q, k, v, plan: list[Call], scale, backend, q_docs=None, k_docs=None,
                   merges_follow: bool = False):
    """Run ``plan`` (from :func:`block_plan`) and merge each block into (out, lse) -> (out, lse).

    Given accumulators (compute dtype) are merged into in place. None: nothing seen yet; a first call
    covering every row then becomes (out, lse) as the kernel returned them (one call needs no merge, nor a
    float32 copy of o), widened to the compute dtype only if another block merges in; written in the compute
    dtype by the kernel when ``merges_follow`` (a later step merges into these rows) or the plan merges more.
    ``q_docs``/``k_docs``: document ids `[Tq]`/`[Tk]` of q and k (packed documents) or None.
    """
    dt = compute_dtype(q.dtype)
    merges_follow = merges_follow or len(plan) > 1
    for call in plan:
        qs, ks = call.q, call.k
        every_row = qs.start == 0 and qs.stop == q.shape[1]
        o_b, lse_b = block_forward(q[:, qs], k[:, ks], v[:, ks], scale, call.mask, backend,
                                   _docs(q_docs, k_docs, call),
                                   out_dtype=dt if out is None and every_row and merges_follow else None)
        if out is None and every_row:
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


def backward_blocks(dq, dk, dv, do, q, k, v, o, lse, plan: list[Call], scale, backend, q_docs=None, k_docs=None,
                    adds_follow: bool = False, kv_widened: bool = False):
    """Add the block gradients of ``plan`` to dq, dk, dv -> (dq, dk, dv); given tensors in the compute dtype
    are added to in place, None ones start as in :func:`accumulate`. The kernels write dq in the compute dtype
    where a call covering every row starts it and ``adds_follow`` (a later step adds to it) or the plan adds
    more, and dk, dv in it with ``kv_widened`` (the caller sums them in the compute dtype)."""
    dt = compute_dtype(q.dtype)
    adds_follow = adds_follow or len(plan) > 1
    for call in plan:
        qs, ks = call.q, call.k
        starts_dq = dq is None and qs.start == 0 and qs.stop == q.shape[1]
        dq_b, dk_b, dv_b = block_backward(do[:, qs], q[:, qs], k[:, ks], v[:, ks], o[:, qs], lse[:, :, qs],
                                          scale, call.mask, backend, _docs(q_docs, k_docs, call),
                                          dq_dtype=dt if starts_dq and adds_follow else None,
                                          dkv_dtype=dt if kv_widened else None)
        dq, dk, dv = accumulate(dq, dq_b, qs, q), accumulate(dk, dk_b, ks, k), accumulate(dv, dv_b, ks, v)
    return dq, dk, dv


def zeros_acc(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape, dtype=compute_dtype(x.dtype), device=x.device)
