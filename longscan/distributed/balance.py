"""Packed documents balanced over an SP group by the order of the documents inside a sequence.

Every SP rank holds the same number of tokens, so balance cannot move tokens between ranks. But the documents
of a packed sequence are attended each alone and the loss is a sum over tokens: any order of the documents
gives the same result, and the order decides which rank holds which tokens. Causal softmax attention costs a
query of in-document position j its j + 1 keys (``documents.causal_pairs_per_rank``); linear layers cost the
same per token in any order. :func:`balanced_order` picks an order that lowers the busiest rank's pairs.

The pairs of a piece of the sequence come in closed form from the documents' lengths: with
F(x) = the pairs of the tokens before global position x, F(cu[k] + m) = sum_{i<k} l_i (l_i + 1) / 2
+ m (m + 1) / 2 for document k of length l_k and 0 <= m <= l_k. A piece [a, b) costs F(b) - F(a), so an order
costs O(N + W log N) to evaluate (N documents, W ranks), and one swap of two documents O(W log N).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from longscan.distributed.layouts import check_layout, num_segments


@dataclass(frozen=True)
class BalanceSearch:
    """How hard :func:`balanced_order` searches. Every bound keeps the search a fixed amount of work per
    sequence, whatever its number of documents."""
    every_order_up_to: int = 7
    """Up to this many documents every order is tried (7 documents: 5040 orders)."""
    starts: int = 3
    """The local search runs from this many of the best fixed orders; the best result is kept."""
    rounds: int = 16
    """Local-search rounds; each takes the best swap that lowers the busiest rank, and the search stops at
    the first round with none."""
    busy_documents: int = 4
    """Documents of the busiest rank (its longest ones) a round tries to swap away."""
    partners: int = 128
    """Positions each of them is tried against (evenly spaced when there are more documents)."""

    def __post_init__(self):
        for name in ("every_order_up_to", "starts", "rounds", "busy_documents", "partners"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"BalanceSearch.{name} must be an integer >= 0, got {v!r}")
        if self.every_order_up_to > 8:
            raise ValueError(f"BalanceSearch.every_order_up_to must be <= 8 (8! orders), got "
                             f"{self.every_order_up_to}")


def _check(lengths: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    check_layout(layout)
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an integer >= 1, got {world!r}")
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.numel() < 1 \
            or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError("lengths must be a 1-D int32/int64 tensor of document lengths [N], N >= 1")
    lengths = lengths.detach().to("cpu", torch.int64)
    if bool((lengths < 1).any()):
        raise ValueError("lengths must all be >= 1 (every document holds at least one token)")
    total, pieces = int(lengths.sum()), num_segments(world, layout)
    if total % pieces:
        raise ValueError(f"the total length {total} must split into the {pieces} pieces of layout={layout!r} "
                         f"over {world} ranks")
    return lengths


def _boundaries(total: int, world: int, layout: str) -> torch.Tensor:
    n = num_segments(world, layout)
    return torch.arange(n + 1, dtype=torch.int64) * (total // n)


def _pairs_before(x: torch.Tensor, cu: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """F(x): causal pairs of the tokens before global position x `[C, P]`, against offsets cu and tri (the
    pairs before each document), both `[C, N + 1]` (one order a row) or `[N + 1]` (one order for all)."""
    k = (torch.searchsorted(cu, x.contiguous(), right=True) - 1).clamp(max=cu.shape[-1] - 1)
    if cu.dim() == 1:
        m = x - cu[k]
        return tri[k] + m * (m + 1) // 2
    m = x - cu.gather(1, k)
    return tri.gather(1, k) + m * (m + 1) // 2


def _ranks(pieces: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    """Per-piece costs `[C, n]` -> per-rank costs `[C, W]` (zigzag: rank r holds pieces r and 2W-1-r)."""
    if layout == "contiguous":
        return pieces
    return pieces[:, :world] + pieces[:, world:].flip(1)


def _prefixes(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu, tri) `[C, N + 1]` of lengths `[C, N]`: document offsets and the pairs before each document."""
    zero = torch.zeros(lengths.shape[0], 1, dtype=torch.int64)
    cu = torch.cat([zero, lengths.cumsum(1)], 1)
    tri = torch.cat([zero, (lengths * (lengths + 1) // 2).cumsum(1)], 1)
    return cu, tri


def rank_pairs(lengths: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    """Causal (query, key) pairs per rank `[C, W]` (int64) of C orders at once: ``lengths`` `[C, N]` (or `[N]`: one
    order) holds each order's document lengths in sequence order, the same total in every row. Row by row it
    equals ``documents.causal_pairs_per_rank``."""
    if lengths.dim() == 1:
        lengths = lengths[None]
    cu, tri = _prefixes(lengths.to(torch.int64))
    b = _boundaries(int(cu[0, -1]), world, layout).expand(cu.shape[0], -1).contiguous()
    return _ranks(_pairs_before(b, cu, tri).diff(dim=1), world, layout)


def swap_pairs(lengths: torch.Tensor, i: torch.Tensor, j: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    """Causal pairs per rank `[C, W]` of the order ``lengths`` `[N]` with documents ``i[c]`` and ``j[c]`` (positions,
    `[C]`) swapped, without building the C orders: only the pieces' ends are evaluated, O(W log N) a swap."""
    lo, hi = torch.minimum(i, j)[:, None], torch.maximum(i, j)[:, None]     # [C, 1]
    cu, tri = (x[0] for x in _prefixes(lengths[None]))
    b = _boundaries(int(cu[-1]), world, layout)[None]                       # [1, n + 1]
    l_lo, l_hi = lengths[lo], lengths[hi]
    start, stop = cu[lo], cu[hi + 1]                                         # the swapped span [start, stop)
    first = (b >= start) & (b < start + l_hi)                                # in the new first document
    last = (b >= stop - l_lo) & (b < stop) & ~first                          # in the new last document
    between = (b >= start) & (b < stop) & ~first & ~last                     # the documents between, shifted
    # elsewhere F(b) is unchanged; between, F(b) = F_old(b - shift) + the change of the swapped pairs
    x = torch.where(between, b - (l_hi - l_lo), b)
    k = (torch.searchsorted(cu, x, right=True) - 1).clamp(max=cu.numel() - 1)
    base, m = tri[k], x - cu[k]
    base = torch.where(between, base + (l_hi * (l_hi + 1) - l_lo * (l_lo + 1)) // 2, base)
    base = torch.where(first, tri[lo], torch.where(last, tri[hi + 1] - l_lo * (l_lo + 1) // 2, base))
    m = torch.where(first, b - start, torch.where(last, b - (stop - l_lo), m))
    return _ranks((base + m * (m + 1) // 2).diff(dim=1), world, layout)


def _fixed_orders(lengths: torch.Tensor, search: BalanceSearch) -> torch.Tensor:
    """Candidate orders `[C, N]`: the given one first, then longest first, shortest first, longest and shortest
    alternating (both ways round), and every order when there are few documents."""
    n = lengths.numel()
    desc = torch.argsort(lengths, descending=True, stable=True)
    alt = torch.empty(n, dtype=torch.int64)
    alt[0::2], alt[1::2] = desc[:(n + 1) // 2], desc.flip(0)[:n // 2]
    orders = [torch.arange(n), desc, desc.flip(0), alt, alt.flip(0)]
    if n <= search.every_order_up_to:
        orders.append(torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int64).reshape(-1, n))
    return torch.cat([o.reshape(-1, n) for o in orders])


def _busy_positions(order_lengths: torch.Tensor, rank: int, world: int, layout: str, cap: int) -> torch.Tensor:
    """Positions of the documents that hold tokens of ``rank`` (its ``cap`` longest)."""
    cu, _ = _prefixes(order_lengths[None])
    b = _boundaries(int(cu[0, -1]), world, layout)
    pieces = [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]
    pos = torch.cat([torch.arange(int(torch.searchsorted(cu[0], b[p], right=True)) - 1,
                                  int(torch.searchsorted(cu[0], b[p + 1])))
                     for p in pieces]).unique()
    return pos[torch.argsort(order_lengths[pos], descending=True, stable=True)[:cap]]


def _descend(lengths: torch.Tensor, order: torch.Tensor, cost: int, world: int, layout: str,
             search: BalanceSearch) -> tuple[torch.Tensor, int]:
    """Local search from ``order`` (whose busiest rank has ``cost`` pairs): each round applies the swap of one of
    the busiest rank's documents that lowers the busiest rank the most, until none does."""
    n = lengths.numel()
    for _ in range(search.rounds):
        ol = lengths[order]
        ranks = rank_pairs(ol, world, layout)[0]
        busy = _busy_positions(ol, int(ranks.argmax()), world, layout, search.busy_documents)
        partners = torch.arange(n) if n <= search.partners else \
            torch.arange(search.partners) * (n - 1) // max(1, search.partners - 1)   # evenly spaced, distinct
        i, j = (x.reshape(-1) for x in torch.meshgrid(busy, partners, indexing="ij"))
        keep = ol[i] != ol[j]                                                # swapping equal lengths changes nothing
        i, j = i[keep], j[keep]
        if i.numel() == 0:
            break
        peaks = swap_pairs(ol, i, j, world, layout).max(1).values
        k = int(peaks.argmin())
        if int(peaks[k]) >= cost:
            break
        order = order.clone()
        order[i[k]], order[j[k]] = order[j[k]].clone(), order[i[k]].clone()
        cost = int(peaks[k])
    return order, cost


def balanced_order(lengths: torch.Tensor, world: int, layout: str, search: BalanceSearch = BalanceSearch()
                   ) -> torch.Tensor:
    """An order of the documents (a permutation `[N]` int64 of their indices) that lowers the busiest rank's causal
    pairs when they are packed in that order and split over ``world`` ranks in ``layout``.

    ``lengths`` `[N]`: the documents' lengths in their given order (the sequence's length must split into the
    layout's pieces). The best ``search.starts`` of a few fixed orders (given, longest first, shortest first,
    alternating; every order for up to ``search.every_order_up_to`` documents) each start a local search that
    swaps one of the busiest rank's documents with another while that lowers the maximum; the best result wins.
    Deterministic (integer arithmetic only), so every rank of a group computes the same order. Never worse than
    the given order, which is returned (the identity) unless another one is strictly better.
    """
    lengths = _check(lengths, world, layout)
    n = lengths.numel()
    if world == 1 or n == 1:
        return torch.arange(n)
    orders = _fixed_orders(lengths, search)
    peak = rank_pairs(lengths[orders], world, layout).max(1).values
    given = int(peak[0])
    best = int(peak.argmin())
    order, cost = orders[best], int(peak[best])
    for s in torch.argsort(peak, stable=True)[:search.starts].tolist():
        found, found_cost = _descend(lengths, orders[s], int(peak[s]), world, layout, search)
        if found_cost < cost:
            order, cost = found, found_cost
    return order if cost < given else torch.arange(n)


def reorder_documents(cu_seqlens: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed sequence with its documents in ``order``: (new cu_seqlens `[N + 1]` int64, source `[T]` int64:
    the old global position of each new global position). Token i of the new sequence is token source[i] of
    the old one; everything per token (ids, labels, loss mask) moves with it."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    lengths = cu.diff()
    order = order.to(torch.int64)
    n = lengths.numel()
    if order.shape != (n,) or not torch.equal(order.sort().values, torch.arange(n)):
        raise ValueError(f"order must be a permutation of the {n} documents' indices, got {order.tolist()}")
    new_lengths = lengths[order]
    new_cu = torch.cat([torch.zeros(1, dtype=torch.int64), new_lengths.cumsum(0)])
    doc = torch.repeat_interleave(torch.arange(n), new_lengths)
    source = cu[order][doc] + torch.arange(int(cu[-1])) - new_cu[doc]
    return new_cu, source
