"""Packed documents in linear attention: the resets, prepared once per ``cu_seqlens``, and per-document states.

Documents run as resets (a log decay of -inf at every document's first token but the sequence's first), so the
kernels start every document from zero. Per-document initial states `[N, H, K, V]` and final states are added
around the kernels by linearity, in torch, on the *runs* of the local tokens: the maximal spans of one document
inside one segment of the layout (one device: one segment, so a run is a document). With D(a→t) the product of
a run's decays from its first token a to t (that token's own decay included) and E the state before a:
- a document's initial state h0_n, on the run where it starts, adds scale·q_tᵀ·D(a→t)·h0_n to its tokens'
  outputs and D(a→end)·h0_n to the state the run leaves (over an SP group, that carries it to later ranks);
- the final state of a document is, on the run where it ends, D(a→end)·E + Σ_t D(t+1→end)·k_t v_tᵀ, where E
  is h0_n (or zero) if the document starts in that run, else the state entering the segment (SP's prefix).
The sums run over a grid of pieces: each run cut into rows of ``piece`` tokens (zero-padded), so every document
is handled by batched matmuls, with no loop over documents and no `[T, K, V]` tensor.

What a call needs from ``cu_seqlens`` (the resets, the runs) is built on the host once per tensor and cached on
the tensor's identity and version: later calls with the same tensor (every layer of a step, its backward) read
nothing back and copy nothing to the device.
"""
from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from longscan.distributed.documents import check_cu_seqlens, global_positions, to_device
from longscan.distributed.layouts import num_segments


@dataclass(frozen=True)
class DocumentRuns:
    """The local tokens of one rank (or of one device) as runs of one document inside one segment, on the device.
    Sizes are host ints: T tokens, R runs, P rows of ``piece`` tokens, N documents, ``n_local`` segments."""
    n_docs: int
    n_local: int
    piece: int
    row: torch.Tensor           # [T] the token's row in the piece grid
    col: torch.Tensor           # [T] its column
    row_run: torch.Tensor       # [P] the run of each row
    row_first: torch.Tensor     # [P] the first row of that run
    run_doc: torch.Tensor       # [R] the document of each run
    run_slot: torch.Tensor      # [R] the local segment of each run
    run_started: torch.Tensor   # [R] bool: the run holds its document's first token
    run_first_row: torch.Tensor  # [R]
    run_last_row: torch.Tensor  # [R]
    ending_runs: torch.Tensor   # [M] the runs that hold their document's last token
    ending_docs: torch.Tensor   # [M] their documents
    slot_last_run: tuple        # per local segment: (its last run, whether it starts its document, the document)

    @property
    def n_rows(self) -> int:
        return int(self.row_run.numel())


def _resets(cu: torch.Tensor, gpos: torch.Tensor, n_local: int, value_dim: int, device) -> torch.Tensor:
    """Whether each local token, at global position ``gpos``, starts a document other than the sequence's first:
    bool `[T]` on ``device``. cu: validated int64 CPU offsets."""
    doc = torch.searchsorted(cu[1:], gpos, right=True)
    return to_device((gpos == cu[doc]) & (doc > 0), device)


def _runs(cu: torch.Tensor, gpos: torch.Tensor, n_local: int, value_dim: int, device) -> DocumentRuns:
    """The runs of the local tokens at global positions ``gpos`` (``n_local`` equal segments), on the host, then
    moved to ``device`` once. cu: validated int64 CPU offsets."""
    T = gpos.numel()
    L = T // n_local
    t = torch.arange(T)
    doc = torch.searchsorted(cu[1:], gpos, right=True)
    first = t % L == 0
    first[1:] |= doc[1:] != doc[:-1]
    run = torch.cumsum(first.long(), 0) - 1
    R = int(first.sum())
    run_start = t[first]
    run_len = torch.bincount(run, minlength=R)
    run_doc = doc[first]
    run_started = gpos[first] == cu[run_doc]
    run_ends = gpos[first] + run_len == cu[run_doc + 1]
    # the piece length that balances the grid's padding (≤ R·piece tokens) against its states (T/piece + R rows)
    piece = max(1, min(T, round(math.sqrt(T * value_dim / R))))
    pieces = (run_len + piece - 1) // piece
    first_row = torch.cumsum(pieces, 0) - pieces
    pos = t - run_start[run]
    row_run = torch.repeat_interleave(torch.arange(R), pieces)
    last_runs = run.view(n_local, L)[:, -1]
    slot_last_run = tuple((int(r), bool(run_started[r]), int(run_doc[r])) for r in last_runs)

    def dev(x):
        return to_device(x, device)
    return DocumentRuns(
        n_docs=cu.numel() - 1, n_local=n_local, piece=piece,
        row=dev(first_row[run] + pos // piece), col=dev(pos % piece),
        row_run=dev(row_run), row_first=dev(first_row[row_run]), run_doc=dev(run_doc),
        run_slot=dev(run_start // L), run_started=dev(run_started), run_first_row=dev(first_row),
        run_last_row=dev(first_row + pieces - 1), ending_runs=dev(torch.nonzero(run_ends)[:, 0]),
        ending_docs=dev(run_doc[run_ends]), slot_last_run=slot_last_run)


@dataclass(frozen=True)
class DocumentRows:
    """Where each token goes when the documents run as the rows `[N, longest]` of a padded batch."""
    doc: torch.Tensor           # [T] its document (row)
    pos: torch.Tensor           # [T] its position in the document (column)
    longest: int


def _padded_rows(cu: torch.Tensor, gpos: torch.Tensor, n_local: int, value_dim: int, device) -> DocumentRows:
    doc = torch.searchsorted(cu[1:], gpos, right=True)
    return DocumentRows(to_device(doc, device), to_device(gpos - cu[doc], device), int((cu[1:] - cu[:-1]).max()))


# (id of the cu_seqlens tensor) -> (weak reference to it, its version, {call key: what was built}). An entry
# leaves when its tensor is freed; the bound only limits how many live tensors keep theirs.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 256


def _prepared(build, cu_seqlens: torch.Tensor, local_len: int, world: int, rank: int, layout: str, device,
              value_dim: int):
    """``build(cu, global positions, n_local, value_dim, device)`` for this tensor and call, validated (ValueError
    naming cu_seqlens) and built on the first call; later calls with the same tensor, unmodified, get the cached
    result without reading it back."""
    if not isinstance(cu_seqlens, torch.Tensor):
        check_cu_seqlens(cu_seqlens, local_len * world)     # the TypeError naming cu_seqlens
    device = torch.device(device) if device is not None else cu_seqlens.device
    key = (build.__name__, local_len, world, rank, layout, device, value_dim)
    ident = id(cu_seqlens)
    slot = _CACHE.get(ident)
    if slot is None or slot[0]() is not cu_seqlens or slot[1] != cu_seqlens._version:
        slot = (weakref.ref(cu_seqlens, lambda _, ident=ident: _CACHE.pop(ident, None)), cu_seqlens._version, {})
        _CACHE[ident] = slot
    _CACHE.move_to_end(ident)
    if key not in slot[2]:
        # validation reads the offsets back (a host-device sync for a CUDA tensor): once per tensor, not per call
        cu = check_cu_seqlens(cu_seqlens, local_len * world)
        slot[2][key] = build(cu, global_positions(local_len, world, rank, layout),
                             num_segments(world, layout) // world, value_dim, device)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return slot[2][key]


def document_resets(cu_seqlens: torch.Tensor, local_len: int, world: int = 1, rank: int = 0,
                    layout: str = "contiguous", device=None) -> torch.Tensor:
    """Whether each of rank ``rank``'s ``local_len`` tokens (one device: world 1) starts a document other than the
    global sequence's first: bool `[local_len]` on ``device``, cached on the tensor (see :func:`_prepared`)."""
    return _prepared(_resets, cu_seqlens, local_len, world, rank, layout, device, 0)


def document_runs(cu_seqlens: torch.Tensor, local_len: int, world: int = 1, rank: int = 0,
                  layout: str = "contiguous", device=None, value_dim: int = 1) -> DocumentRuns:
    """The runs of rank ``rank``'s ``local_len`` tokens (one device: world 1) for the documents ``cu_seqlens``,
    for per-document states of value dimension ``value_dim``, cached on the tensor (see :func:`_prepared`)."""
    return _prepared(_runs, cu_seqlens, local_len, world, rank, layout, device, value_dim)


def document_rows(cu_seqlens: torch.Tensor, total: int, device=None) -> DocumentRows:
    """The padded-batch places of one device's ``total`` tokens, cached on the tensor (see :func:`_prepared`)."""
    return _prepared(_padded_rows, cu_seqlens, total, 1, 0, "contiguous", device, 0)


def base_log_decay(q, g, g_gamma) -> torch.Tensor:
    """The per-token log decay before resets: g, g_gamma broadcast to `[B, T, H]`, or zeros without a decay."""
    B, T, H, _ = q.shape
    if g is not None:
        return g
    if g_gamma is not None:
        return g_gamma.view(1, 1, H).expand(B, T, H)
    return torch.zeros(B, T, H, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                       device=q.device)


def check_finite_decay(g) -> None:
    """Refuse a g holding -inf (resets of the caller's own) with per-document states: their sums take
    differences of cumulative log decays, which -inf turns into NaN. Reading the values back stalls a GPU stream,
    so on CUDA the check runs only behind the opt-in checks (LONGSCAN_CHECKS=1), as ``check_log_decay`` does."""
    from longscan.distributed.checks import checks_enabled   # at call time: distributed imports the kernels
    if g is None or (g.device.type != "cpu" and not checks_enabled()):
        return
    with torch.no_grad():
        if bool(torch.isneginf(g).any()):
            raise ValueError("g holds -inf (a reset of its own) inside the documents: per-document initial_state "
                             "and output_final_state need finite log decays with cu_seqlens (the documents' own "
                             "resets come from cu_seqlens)")


def with_resets_gate(base: torch.Tensor, resets: torch.Tensor) -> torch.Tensor:
    """``base`` with -inf at the tokens where ``resets`` `[T]` holds, in a new tensor: there the state before the
    token is dropped whole, so the gradient of base at a reset is 0 (the decay multiplies a zero state when the
    document runs alone)."""
    T = base.shape[1]
    return base.masked_fill(resets.view((1, T) + (1,) * (base.dim() - 2)), float("-inf"))


def _rows(x: torch.Tensor, runs: DocumentRuns, dtype) -> torch.Tensor:
    """`[1, T, ...]` -> the piece grid `[P, piece, ...]`, zero-padded (autograd runs through the scatter)."""
    out = x.new_zeros((runs.n_rows, runs.piece) + tuple(x.shape[2:]), dtype=dtype)
    return out.index_put((runs.row, runs.col), x[0].to(dtype))


@dataclass(frozen=True)
class RunDecays:
    """The cumulative log decays of the runs on the piece grid."""
    inside: torch.Tensor    # [P, piece, H(, K)]: Σ of the run's log decays from its first token to this one
    total: torch.Tensor     # [R, H(, K)]: the run's whole sum


def run_decays(base: torch.Tensor, runs: DocumentRuns, input_dtype) -> RunDecays:
    """Cumulative sums inside each row, then each row's offset from the rows before it in its run; the offsets
    in float64, so a long run's sums lose nothing to a cumulative sum over the whole sequence. The states' terms
    are computed in the dtype of these sums: float64 for float64 inputs (``input_dtype``), else float32."""
    dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    within = _rows(base, runs, dtype).cumsum(1)
    tot = within[:, -1].double()
    upto = tot.cumsum(0)          # through each row
    before = upto - tot
    offset = (before - before[runs.row_first]).to(dtype)
    inside = within + offset.unsqueeze(1)
    total = (upto[runs.run_last_row] - before[runs.run_first_row]).to(dtype)
    return RunDecays(inside, total)


def _per_key(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A decay factor of a scalar gate `[..., H]` as `[..., H, 1]` (broadcast over K); per-key ones unchanged."""
    return x.unsqueeze(-1) if base.dim() == 3 else x


def _on_state(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A decay factor `[..., H]` or `[..., H, K]` shaped to scale states `[..., H, K, V]`."""
    return _per_key(x, base).unsqueeze(-1)


def start_outputs(q, base, initial_state, runs: DocumentRuns, decays: RunDecays, scale) -> torch.Tensor:
    """scale·q_tᵀ·D(a→t)·h0_n for the tokens of the runs that start their document n -> `[1, T, H, V]`."""
    dtype = decays.inside.dtype
    h0 = initial_state.to(dtype)[runs.run_doc] * runs.run_started.view(-1, 1, 1, 1).to(dtype)
    qd = _rows(q, runs, dtype) * _per_key(decays.inside.exp(), base)
    o = torch.einsum("pchk,phkv->pchv", qd, h0[runs.row_run]) * scale
    return o[runs.row, runs.col].unsqueeze(0)


def leaving_states(base, initial_state, runs: DocumentRuns, decays: RunDecays) -> torch.Tensor:
    """What the documents' initial states add to the state each local segment leaves `[n_local, 1, H, K, V]`:
    D(a→end)·h0_n where the segment's last run starts its document n, else zero."""
    dtype = decays.total.dtype
    h0 = initial_state.to(dtype)
    out = []
    for r, started, doc in runs.slot_last_run:
        if started:
            out.append(_on_state(decays.total[r].exp(), base) * h0[doc])
        else:
            out.append(torch.zeros_like(h0[0]))
    return torch.stack(out).unsqueeze(1)


def document_finals(k, v, base, initial_state, entering, runs: DocumentRuns, decays: RunDecays) -> torch.Tensor:
    """Each document's state after its last token `[N, H, K, V]`, from the run that holds that token (zero for the
    documents that end elsewhere). entering: the state entering each local segment `[n_local, 1, H, K, V]` (None
    on one device, where every document starts in its only segment)."""
    dtype = decays.inside.dtype
    w = _per_key((decays.total[runs.row_run].unsqueeze(1) - decays.inside).exp(), base)
    states = torch.einsum("pchk,pchv->phkv", _rows(k, runs, dtype) * w, _rows(v, runs, dtype))
    H, K, V = states.shape[1:]
    per_run = states.new_zeros((runs.run_doc.numel(), H, K, V)).index_add(0, runs.row_run, states)
    ends = runs.ending_runs
    before = states.new_zeros((ends.numel(), H, K, V))
    started = runs.run_started[ends].view(-1, 1, 1, 1)
    if initial_state is not None:
        before = torch.where(started, initial_state.to(dtype)[runs.run_doc[ends]], before)
    if entering is not None:
        before = torch.where(started, before, entering[:, 0].to(dtype)[runs.run_slot[ends]])
    finals = per_run[ends] + _on_state(decays.total[ends].exp(), base) * before
    return finals.new_zeros((runs.n_docs, H, K, V)).index_copy(0, runs.ending_docs, finals)


__all__ = ["DocumentRuns", "DocumentRows", "document_resets", "document_runs", "document_rows", "base_log_decay", "check_finite_decay",
           "with_resets_gate", "run_decays", "RunDecays", "start_outputs", "leaving_states", "document_finals"]
