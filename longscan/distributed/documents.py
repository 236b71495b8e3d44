"""Packed documents over a sequence layout: which document each local token belongs to.

Documents are given fla's way: ``cu_seqlens`` `[N + 1]` (int32/int64) holds offsets into the *global*
sequence, 0 = cu[0] < cu[1] < ... < cu[N] = T_global, the same on every rank. Attention never crosses a
document boundary, and positions (RoPE) restart at 0 in every document.

The maps here follow ``layouts.py``: a rank's local tokens are its pieces (segments) in local order. For a
pair (query piece a, key piece b) the question "can any query of a see any key of b" is answered from the
documents at the pieces' ends alone, because document ids never decrease along the sequence:
- causal, b < a: only the document that ends piece b and starts piece a can be shared;
- causal, b == a: always (every token sees itself);
- not causal: the two pieces' document ranges overlap.
The rows of the shared documents in each piece are a rectangle (``visible_blocks``), the only part of the pair
a kernel needs to see.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from longscan.distributed.layouts import check_layout, num_segments, segment_ids


def check_cu_seqlens(cu_seqlens, total: int) -> torch.Tensor:
    """Validate ``cu_seqlens`` against a global length ``total`` -> int64 CPU copy."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [N + 1] with N >= 1, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the global length {total}, got "
                         f"{int(cu[0])} ... {int(cu[-1])}")
    if bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError("cu_seqlens must be strictly increasing (every document holds at least one token)")
    return cu


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A CPU map onto ``device`` without a host-device sync: pinned and non-blocking on CUDA (a pageable copy
    would wait for the stream at every attention call)."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


# (id of a cu_seqlens tensor) -> (weak reference to it, its version, {key: what was built}). An entry leaves
# when its tensor is freed; the bound only limits how many live tensors keep theirs.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 256


def cached_on(cu_seqlens: torch.Tensor, key: tuple, build):
    """``build()`` for this ``cu_seqlens`` tensor and ``key``, made on the first call and kept while the tensor
    lives unmodified (its identity and version): every layer of a step and its backward then share one result,
    and read nothing back from the device."""
    ident = id(cu_seqlens)
    slot = _CACHE.get(ident)
    if slot is None or slot[0]() is not cu_seqlens or slot[1] != cu_seqlens._version:
        slot = (weakref.ref(cu_seqlens, lambda _, ident=ident: _CACHE.pop(ident, None)), cu_seqlens._version, {})
        _CACHE[ident] = slot
    _CACHE.move_to_end(ident)
    if key not in slot[2]:
        slot[2][key] = build()
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return slot[2][key]


def checked_cu_seqlens(cu_seqlens, total: int) -> torch.Tensor:
    """:func:`check_cu_seqlens` once per tensor (:func:`cached_on`): later calls with the same, unchanged tensor
    get the same int64 CPU copy without reading a CUDA tensor back."""
    if not isinstance(cu_seqlens, torch.Tensor):
        check_cu_seqlens(cu_seqlens, total)     # the TypeError naming cu_seqlens
    return cached_on(cu_seqlens, ("checked", total), lambda: check_cu_seqlens(cu_seqlens, total))


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Document index `[total]` (int64) of every global token."""
    cu = check_cu_seqlens(cu_seqlens, total)
    return torch.searchsorted(cu[1:], torch.arange(total), right=True)


def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every global token inside its document `[total]` (int64), for RoPE."""
    cu = check_cu_seqlens(cu_seqlens, total)
    return torch.arange(total) - cu[document_ids(cu, total)]


def global_positions(local_len: int, world: int, rank: int, layout: str) -> torch.Tensor:
    """Global index `[local_len]` of each local token (``layouts.positions`` without a process group)."""
    check_layout(layout)
    segs = segment_ids(rank, world, layout)
    if local_len % len(segs):
        raise ValueError(f"layout={layout!r} needs a local length divisible by {len(segs)}, got {local_len}")
    n = local_len // len(segs)
    return torch.cat([torch.arange(s * n, (s + 1) * n) for s in segs])


def causal_pairs_per_rank(cu_seqlens: torch.Tensor, total: int, world: int, layout: str) -> list[int]:
    """The (query, key) pairs each rank's queries attend to in causal attention over packed documents: a query
    sees the keys of its own document up to itself. Softmax attention's work on a rank is about proportional
    to it; the linear layers' work is per token, equal on every rank."""
    if total % world:
        raise ValueError(f"the global length {total} must split over {world} ranks")
    seen = document_positions(cu_seqlens, total) + 1
    return [int(seen[global_positions(total // world, world, r, layout)].sum()) for r in range(world)]


def piece_documents(cu_seqlens: torch.Tensor, n_pieces: int, seg_len: int) -> list[tuple[int, int]]:
    """(first, last) document id of each of the ``n_pieces`` global pieces of ``seg_len`` tokens."""
    doc = document_ids(cu_seqlens, n_pieces * seg_len)
    return [(int(doc[p * seg_len]), int(doc[(p + 1) * seg_len - 1])) for p in range(n_pieces)]


@dataclass(frozen=True)
class VisibleBlock:
    """The part of a (query piece, key piece) pair that holds its visible keys: query rows ``q`` and key rows ``k``
    as (start, stop) offsets inside the two pieces, and ``docs``: whether a document mask is still needed
    inside that rectangle (more than one document meets in it; otherwise every pair in it is visible, up to
    the causal diagonal of a piece against itself)."""
    q: tuple[int, int]
    k: tuple[int, int]
    docs: bool


def visible_blocks(cu_seqlens: torch.Tensor, n_pieces: int, seg_len: int, causal: bool = True
                   ) -> dict[tuple[int, int], VisibleBlock]:
    """{(query piece, key piece): :class:`VisibleBlock`}, global piece ids, for the pairs in which some query
    may attend some key. Causal, b < a: only the document that ends piece b and starts piece a is shared, so
    the rectangle is that document's rows in each piece and needs no document mask."""
    cu = check_cu_seqlens(cu_seqlens, n_pieces * seg_len).tolist()
    docs = piece_documents(cu_seqlens, n_pieces, seg_len)
    out = {}
    for a, (qa, qz) in enumerate(docs):
        for b, (ka, kz) in enumerate(docs):
            if causal and (b > a or (b < a and kz != qa)):
                continue
            lo, hi = (qa, qz) if a == b else (max(qa, ka), min(qz, kz))
            if lo > hi:
                continue
            rows = lambda p: (max(cu[lo] - p * seg_len, 0), min(cu[hi + 1] - p * seg_len, seg_len))  # noqa: E731
            out[(a, b)] = VisibleBlock(rows(a), rows(b), lo != hi)
    return out


def visible_pieces(cu_seqlens: torch.Tensor, n_pieces: int, seg_len: int, causal: bool = True
                   ) -> frozenset[tuple[int, int]]:
    """The (query piece, key piece) pairs, global ids, in which some query may attend some key."""
    return frozenset(visible_blocks(cu_seqlens, n_pieces, seg_len, causal))


@dataclass(frozen=True)
class LocalDocuments:
    """What one rank needs to know about the documents of its local tokens."""
    doc_ids: torch.Tensor        # [T_local] int64: document of each local token
    positions: torch.Tensor      # [T_local] int64: position inside its document (RoPE)
    spans: tuple                 # per local piece: ((doc, local start, local stop), ...) in local token offsets
    visible: frozenset           # global (query piece, key piece) pairs with at least one visible key


def local_documents(cu_seqlens: torch.Tensor, local_len: int, world: int, rank: int, layout: str,
                    causal: bool = True) -> LocalDocuments:
    """The document maps of rank ``rank``'s ``local_len`` tokens in ``layout`` over ``world`` ranks."""
    check_layout(layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    total = local_len * world
    cu = check_cu_seqlens(cu_seqlens, total)
    gpos = global_positions(local_len, world, rank, layout)
    doc = document_ids(cu, total)[gpos]
    pos = gpos - cu[doc]
    n = num_segments(world, layout)
    seg_len = total // n
    spans = []
    for slot in range(len(segment_ids(rank, world, layout))):
        lo = slot * seg_len
        d = doc[lo:lo + seg_len]
        starts = [0] + [i for i in range(1, seg_len) if d[i] != d[i - 1]] + [seg_len]
        spans.append(tuple((int(d[s]), lo + s, lo + e) for s, e in zip(starts[:-1], starts[1:])))
    return LocalDocuments(doc, pos, tuple(spans), visible_pieces(cu, n, seg_len, causal))
