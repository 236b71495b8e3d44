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
Both terms are grouped products of each token with its document's state (:class:`GroupedMatmul`,
:class:`GroupedOuter`): each run cut into rows of ``piece`` tokens, the (token, head) pairs gathered once into a
grid `[rows · H, piece, D]`, one bmm against each row's state (input dtype, float32 sums), one gather back. No loop
over documents, no atomics on token-sized tensors, no host read-back, no `[T, K, V]` tensor; the backward is the
same two products, written out.

What a call needs from ``cu_seqlens`` (the resets, the runs) is built on the host once per tensor and cached on
the tensor's identity and version: later calls with the same tensor (every layer of a step, its backward) read
nothing back and copy nothing to the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from longscan.distributed.documents import cached_on, checked_cu_seqlens, global_positions, to_device
from longscan.distributed.layouts import num_segments


@dataclass(frozen=True)
class DocumentRuns:
    """The local tokens of one rank (or of one device) as runs of one document inside one segment, on the device,
    and the grid of rows of ``piece`` tokens the runs are cut into (a run's last row padded). Sizes are host ints:
    T tokens, R runs, P rows, N documents, ``n_local`` segments."""
    n_docs: int
    n_local: int
    piece: int
    token_slot: torch.Tensor    # [T] the token's slot in the grid (row · piece + column)
    token_run: torch.Tensor     # [T] its run
    slot_token: torch.Tensor    # [P · piece] the token in each slot (a pad: its run's last token)
    slot_valid: torch.Tensor    # [P · piece] bool: the slot holds its token (not a pad)
    row_first: torch.Tensor     # [P] the first row of the row's run
    row_start_doc: torch.Tensor  # [P] the document of the row's run if the run starts it, else N (no document)
    row_end_doc: torch.Tensor   # [P] the document of the row's run if the run ends it, else N
    run_doc: torch.Tensor       # [R] the document of each run
    run_slot: torch.Tensor      # [R] the local segment of each run
    run_started: torch.Tensor   # [R] bool: the run holds its document's first token
    run_last: torch.Tensor      # [R] the run's last token
    ending_runs: torch.Tensor   # [M] the runs that hold their document's last token
    ending_docs: torch.Tensor   # [M] their documents
    slot_last_run: tuple        # per local segment: (its last run, whether it starts its document, the document)
    grids: dict = field(default_factory=dict, compare=False)   # heads -> the grid's (t, h) indices (GridIndex)

    @property
    def n_rows(self) -> int:
        return int(self.row_first.numel())


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
    N = cu.numel() - 1
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
    # the piece length that balances the grid's padding (≤ R·piece tokens) against its per-row states (T/piece + R
    # rows of [K, V])
    piece = max(1, min(T, round(math.sqrt(T * value_dim / R))))
    pieces = (run_len + piece - 1) // piece
    first_row = torch.cumsum(pieces, 0) - pieces
    pos = t - run_start[run]
    row_run = torch.repeat_interleave(torch.arange(R), pieces)
    P = row_run.numel()
    token_slot = (first_row[run] + pos // piece) * piece + pos % piece
    slot_token = (run_start + run_len - 1)[row_run].repeat_interleave(piece)    # pads: the run's last token
    slot_token[token_slot] = t
    slot_valid = torch.zeros(P * piece, dtype=torch.bool)
    slot_valid[token_slot] = True
    last_runs = run.view(n_local, L)[:, -1]
    slot_last_run = tuple((int(r), bool(run_started[r]), int(run_doc[r])) for r in last_runs)

    def dev(x):
        return to_device(x, device)
    return DocumentRuns(
        n_docs=N, n_local=n_local, piece=piece, token_slot=dev(token_slot), token_run=dev(run),
        slot_token=dev(slot_token), slot_valid=dev(slot_valid), row_first=dev(first_row[row_run]),
        row_start_doc=dev(torch.where(run_started, run_doc, N)[row_run]),
        row_end_doc=dev(torch.where(run_ends, run_doc, N)[row_run]), run_doc=dev(run_doc),
        run_slot=dev(run_start // L), run_started=dev(run_started), run_last=dev(run_start + run_len - 1),
        ending_runs=dev(torch.nonzero(run_ends)[:, 0]), ending_docs=dev(run_doc[run_ends]),
        slot_last_run=slot_last_run)


@dataclass(frozen=True)
class DocumentRows:
    """Where each token goes when the documents run as the rows `[N, longest]` of a padded batch."""
    doc: torch.Tensor           # [T] its document (row)
    pos: torch.Tensor           # [T] its position in the document (column)
    longest: int


def _padded_rows(cu: torch.Tensor, gpos: torch.Tensor, n_local: int, value_dim: int, device) -> DocumentRows:
    doc = torch.searchsorted(cu[1:], gpos, right=True)
    return DocumentRows(to_device(doc, device), to_device(gpos - cu[doc], device), int((cu[1:] - cu[:-1]).max()))


def _prepared(build, cu_seqlens: torch.Tensor, local_len: int, world: int, rank: int, layout: str, device,
              value_dim: int):
    """``build(cu, global positions, n_local, value_dim, device)`` for this tensor and call, validated (ValueError
    naming cu_seqlens) and built on the first call; later calls with the same tensor, unmodified, get the cached
    result without reading it back (:func:`~longscan.distributed.documents.cached_on`)."""
    # validation reads the offsets back (a host-device sync for a CUDA tensor): once per tensor, not per call
    cu = checked_cu_seqlens(cu_seqlens, local_len * world)
    device = torch.device(device) if device is not None else cu_seqlens.device

    def make():
        return build(cu, global_positions(local_len, world, rank, layout), num_segments(world, layout) // world,
                     value_dim, device)
    return cached_on(cu_seqlens, (build.__name__, local_len, world, rank, layout, device, value_dim), make)


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


# 0-dim tensors of -inf and 0 on each device, made once: a Python number in torch.where becomes a tensor (a fill
# launched on a GPU) on every call
_FILLS: dict = {}


def _fills(device) -> tuple:
    if device not in _FILLS:
        _FILLS[device] = (torch.full((), float("-inf"), device=device), torch.zeros((), device=device))
    return _FILLS[device]


class _ResetGate(torch.autograd.Function):
    """base with -inf where mask holds, and a gradient of 0 there: one select each way (masked_fill is a copy and a
    fill, in the forward and again in its backward)."""

    @staticmethod
    def forward(ctx, base, mask):
        ctx.save_for_backward(mask)
        return torch.where(mask, _fills(base.device)[0], base)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        return torch.where(mask, _fills(grad.device)[1], grad), None


def with_resets_gate(base: torch.Tensor, resets: torch.Tensor) -> torch.Tensor:
    """``base`` with -inf at the tokens where ``resets`` `[T]` holds, in a new tensor: there the state before the
    token is dropped whole, so the gradient of base at a reset is 0 (the decay multiplies a zero state when the
    document runs alone)."""
    T = base.shape[1]
    return _ResetGate.apply(base, resets.view((1, T) + (1,) * (base.dim() - 2)))


@dataclass(frozen=True)
class GridIndex:
    """The grid `[P, H, piece]` of (token, head) pairs, for tensors `[T, H, D]` viewed as `[T·H, D]`."""
    gather: torch.Tensor    # [P·H·piece] the (token, head) of each grid place (pads: their run's last token)
    gather_zero: torch.Tensor   # the same with pads at the zero token T of a `[T + 1, H, D]` tensor (see _weighted)
    scatter: torch.Tensor   # [T·H] the grid place of each (token, head)
    piece: int


def grid_index(runs: DocumentRuns, heads: int) -> GridIndex:
    """The grid's indices for ``heads`` heads, built on the device on the first call and kept on ``runs``."""
    if heads not in runs.grids:
        P, piece = runs.n_rows, runs.piece
        T = runs.token_slot.numel()
        h = torch.arange(heads, device=runs.slot_token.device)
        gather = runs.slot_token.view(P, 1, piece) * heads + h.view(1, heads, 1)
        zero = torch.where(runs.slot_valid.view(P, 1, piece), gather, T * heads + h.view(1, heads, 1))
        place = runs.token_slot.view(-1, 1)
        scatter = ((place // piece * heads + h) * piece + place % piece)
        runs.grids[heads] = GridIndex(gather.view(-1), zero.view(-1), scatter.view(-1), piece)
    return runs.grids[heads]


def _to_grid(x: torch.Tensor, index: torch.Tensor, piece: int) -> torch.Tensor:
    """`[T, H, D]` (or `[T + 1, H, D]`) -> `[P·H, piece, D]` at ``index`` (one gather)."""
    D = x.shape[-1]
    return x.reshape(-1, D).index_select(0, index).view(-1, piece, D)


def _weighted(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x ⊙ w in x's dtype, then one zero token: `[T + 1, H, K]`, the token the grid's pads read (``gather_zero``)
    where they must add nothing to a sum over a row."""
    out = x.new_empty((x.shape[0] + 1,) + tuple(x.shape[1:]))
    torch.mul(x, w.to(x.dtype), out=out[:-1])
    out[-1].zero_()
    return out


def _accumulate(a: torch.Tensor, b: torch.Tensor, acc) -> torch.Tensor:
    """a @ b of batched matrices in their dtype, accumulated and returned in ``acc`` (float32 for 16-bit inputs:
    on CUDA one bmm with a float32 output; elsewhere the operands are converted)."""
    if a.dtype == acc:
        return torch.bmm(a, b)
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=acc)
    return torch.bmm(a.to(acc), b.to(acc))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_of(m: torch.Tensor, row_group: torch.Tensor) -> torch.Tensor:
    """Each grid row's matrix: m `[G, H, A, B]` -> `[P·H, A, B]`."""
    return m.index_select(0, row_group).flatten(0, 1)


def _grouped_mm(xg: torch.Tensor, mrows: torch.Tensor, T: int, grid: GridIndex) -> torch.Tensor:
    """y_t = x_t · m[g(t)] per head, from x on the grid `[P·H, piece, K]` and each row's matrix `[P·H, K, V]`: one
    bmm, then one gather back to `[T, H, V]` in x's dtype."""
    V = mrows.shape[-1]
    return torch.bmm(xg, mrows).view(-1, V).index_select(0, grid.scatter).view(T, -1, V)


def _grouped_outer(xg: torch.Tensor, yg: torch.Tensor, row_group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """S_g = Σ_{t in group g} x_tᵀ y_t per head, from x and y on the grid (`[P·H, piece, K]`, `[P·H, piece, V]`) ->
    `[G, H, K, V]` in float32 (float64 for float64 inputs). x's pads must be zeros (``gather_zero``); one bmm, then
    one sum of the rows into their groups."""
    K, V = xg.shape[-1], yg.shape[-1]
    s = _accumulate(xg.transpose(1, 2), yg, _acc_dtype(xg.dtype)).view(row_group.numel(), -1, K, V)
    return s.new_zeros((n_groups,) + tuple(s.shape[1:])).index_add_(0, row_group, s)


def _weight_grad(dxw: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient of w in xw = x ⊙ w (w `[T, H, K]`, or `[T, H, 1]` broadcast over K), in w's dtype: the
    products in x's dtype, a scalar gate's sum over K in w's."""
    d = dxw * x
    return d.sum(-1, keepdim=True, dtype=w.dtype) if w.shape[-1] == 1 != x.shape[-1] else d.to(w.dtype)


class GroupedMatmul(torch.autograd.Function):
    """y_t = (x_t ⊙ w_t) · m[g(t)] for every token t and head (g(t): the group of t's grid row), `[T, H, V]` in x's
    dtype. Backward: the same product against mᵀ, and the grouped outer products for m's gradient."""

    @staticmethod
    def forward(ctx, x, w, m, row_group, grid: GridIndex):
        ctx.save_for_backward(x, w, m, row_group)
        ctx.grid = grid
        xg = _to_grid(_weighted(x, w), grid.gather_zero, grid.piece)
        return _grouped_mm(xg, _rows_of(m.to(x.dtype), row_group), x.shape[0], grid)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w, m, row_group = ctx.saved_tensors
        grid, T = ctx.grid, x.shape[0]
        dyg = _to_grid(dy.to(x.dtype), grid.gather, grid.piece)
        dx = dw = dm = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dxw = _grouped_mm(dyg, _rows_of(m.to(x.dtype).transpose(-1, -2), row_group), T, grid)
            dx = dxw * w.to(x.dtype) if ctx.needs_input_grad[0] else None
            dw = _weight_grad(dxw, x, w) if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            xg = _to_grid(_weighted(x, w), grid.gather_zero, grid.piece)
            dm = _grouped_outer(xg, dyg, row_group, m.shape[0]).to(m.dtype)
        return dx, dw, dm, None, None


class GroupedOuter(torch.autograd.Function):
    """S_g = Σ_{t in group g} (x_t ⊙ w_t)ᵀ y_t per head `[G, H, K, V]`, float32 (float64 for float64 inputs).
    Backward: grouped products of y and x against each group's gradient."""

    @staticmethod
    def forward(ctx, x, w, y, row_group, n_groups: int, grid: GridIndex):
        ctx.save_for_backward(x, w, y, row_group)
        ctx.grid = grid
        xg = _to_grid(_weighted(x, w), grid.gather_zero, grid.piece)
        return _grouped_outer(xg, _to_grid(y.to(x.dtype), grid.gather, grid.piece), row_group, n_groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds):
        x, w, y, row_group = ctx.saved_tensors
        grid, T = ctx.grid, x.shape[0]
        ds = ds.to(x.dtype)
        dx = dw = dy = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            yg = _to_grid(y.to(x.dtype), grid.gather, grid.piece)
            dxw = _grouped_mm(yg, _rows_of(ds.transpose(-1, -2), row_group), T, grid)
            dx = dxw * w.to(x.dtype) if ctx.needs_input_grad[0] else None
            dw = _weight_grad(dxw, x, w) if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            xg = _to_grid(_weighted(x, w), grid.gather_zero, grid.piece)
            dy = _grouped_mm(xg, _rows_of(ds, row_group), T, grid).to(y.dtype)
        return dx, dw, dy, None, None, None


@dataclass(frozen=True)
class RunDecays:
    """The cumulative log decays of the runs."""
    inside: torch.Tensor    # [T, H(, K)]: Σ of the token's run's log decays from its first token to this one
    total: torch.Tensor     # [R, H(, K)]: the run's whole sum


def run_decays(base: torch.Tensor, runs: DocumentRuns, input_dtype) -> RunDecays:
    """Cumulative sums inside each row of the grid (a gather of the gate), then each row's offset from the rows
    before it in its run, read back at the tokens. In the dtype of the states' sums: float64 for float64 inputs
    (``input_dtype``), else float32."""
    dtype = _acc_dtype(input_dtype)
    rest = tuple(base.shape[2:])
    P, piece = runs.n_rows, runs.piece
    within = base.squeeze(0).index_select(0, runs.slot_token).to(dtype).view((P, piece) + rest).cumsum(1)
    # the rows' offsets in float64 (tiny: [P, H(, K)]): they are differences of cumulative sums over the whole
    # sequence, which in float32 would lose a long sequence's low bits; a run's last row also sums its pads, which
    # only the rows of later runs see, and they subtract it again
    tot = within[:, -1].double()
    before = tot.cumsum(0) - tot
    inside = within + (before - before.index_select(0, runs.row_first)).to(dtype).unsqueeze(1)
    inside = inside.view((P * piece,) + rest).index_select(0, runs.token_slot)
    return RunDecays(inside, inside.index_select(0, runs.run_last))


def _per_key(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A decay factor of a scalar gate `[..., H]` as `[..., H, 1]` (broadcast over K); per-key ones unchanged."""
    return x.unsqueeze(-1) if base.dim() == 3 else x


def _on_state(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A decay factor `[..., H]` or `[..., H, K]` shaped to scale states `[..., H, K, V]`."""
    return _per_key(x, base).unsqueeze(-1)


def _with_empty(states: torch.Tensor) -> torch.Tensor:
    """`[N, H, K, V]` and one zero state more: the group N of the rows that belong to no document's term."""
    return torch.cat([states, states.new_zeros((1,) + tuple(states.shape[1:]))])


def start_outputs(q, base, initial_state, runs: DocumentRuns, decays: RunDecays, scale) -> torch.Tensor:
    """scale·q_tᵀ·D(a→t)·h0_n for the tokens of the runs that start their document n -> `[1, T, H, V]` in q's
    dtype: one grouped product of the tokens with their document's state (zero for the other runs)."""
    H = q.shape[2]
    w = _per_key(decays.inside.exp() * scale, base)
    o = GroupedMatmul.apply(q.squeeze(0), w, _with_empty(initial_state), runs.row_start_doc, grid_index(runs, H))
    return o.unsqueeze(0)


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
    documents that end elsewhere): one grouped sum of the run's tokens' outer products, decayed to its end.
    entering: the state entering each local segment `[n_local, 1, H, K, V]` (None on one device, where every
    document starts in its only segment)."""
    H = k.shape[2]
    w = _per_key((decays.total.index_select(0, runs.token_run) - decays.inside).exp(), base)
    grid = grid_index(runs, H)
    finals = GroupedOuter.apply(k.squeeze(0), w, v.squeeze(0), runs.row_end_doc, runs.n_docs + 1, grid)[:-1]
    dtype = finals.dtype
    ends = runs.ending_runs
    started = runs.run_started[ends].view(-1, 1, 1, 1)
    if initial_state is None and entering is None:
        return finals
    before = finals.new_zeros((ends.numel(),) + tuple(finals.shape[1:]))
    if initial_state is not None:
        before = torch.where(started, initial_state.to(dtype).index_select(0, runs.run_doc[ends]), before)
    if entering is not None:
        before = torch.where(started, before, entering[:, 0].to(dtype).index_select(0, runs.run_slot[ends]))
    carried = _on_state(decays.total.index_select(0, ends).exp(), base) * before
    return finals.index_add(0, runs.ending_docs, carried)


__all__ = ["DocumentRuns", "DocumentRows", "GridIndex", "GroupedMatmul", "GroupedOuter", "document_resets",
           "document_runs", "document_rows", "base_log_decay", "check_finite_decay", "grid_index", "with_resets_gate",
           "run_decays", "RunDecays", "start_outputs", "leaving_states", "document_finals"]
