"""Resume a checkpoint written with other TP and/or PP sizes: each rank reads the saved pieces it needs.

A checkpoint holds a TP-sharded parameter as ``<name>@tp<s>`` for each saved TP rank ``s`` (the full
tensor split into equal pieces along the parameter's megatron ``partition_dim``), a TP-replicated one
(norm weights) under ``<name>``, and layers under their global index, so a PP change only changes which
rank asks for which keys. For each parameter of this rank's stage, :func:`load_resharded` reads the saved
pieces that overlap this rank's slice of the full tensor, and copies the overlaps into the parameter and
into AdamW's ``exp_avg`` / ``exp_avg_sq`` (elementwise state: it follows its parameter's split); AdamW's
step counter is the same for every piece. The read goes through :class:`checkpoint.VerifiedReader`
(checksums before unpickling, the restricted unpickler) like a same-layout resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp

from longscan.training import checkpoint as ckpt
from longscan.training.checkpoint import tp_split_dim

MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-element state: shaped like the parameter, split like it."""


@dataclass(frozen=True)
class Piece:
    """The part of one saved TP shard that lands in this rank's shard, along the split dimension."""
    saved_rank: int
    src: slice
    """Indices within the saved shard."""
    dst: slice
    """Indices within this rank's shard."""


def pieces(full: int, saved_tp: int, tp: int, tp_rank: int) -> list[Piece]:
    """Overlaps of this rank's slice (``tp`` equal slices of ``full``) with the ``saved_tp`` saved slices."""
    if full % saved_tp or full % tp:
        raise ckpt.CheckpointMismatch(f"a split dimension of {full} does not divide into the checkpoint's "
                                      f"{saved_tp} or this run's {tp} TP pieces")
    ss, ls = full // saved_tp, full // tp
    lo, hi = tp_rank * ls, (tp_rank + 1) * ls
    out = []
    for s in range(lo // ss, -(-hi // ss)):
        a, b = max(lo, s * ss), min(hi, (s + 1) * ss)
        out.append(Piece(s, slice(a - s * ss, b - s * ss), slice(a - lo, b - lo)))
    return out


def _along(t: torch.Tensor, dim: int, idx: slice) -> torch.Tensor:
    return t[(slice(None),) * dim + (idx,)]


def _sources(name: str, p: torch.Tensor, saved_tp: int, tp: int, tp_rank: int):
    """-> (split dim or None, saved shard shape, [(saved key, piece or None for the whole tensor)])."""
    dim = tp_split_dim(p)
    if dim is None:  # replicated over TP (norm weights): one saved copy, as large as this rank's
        return None, tuple(p.shape), [(name, None)]
    full = p.shape[dim] * tp
    shape = list(p.shape)
    shape[dim] = full // saved_tp
    return dim, tuple(shape), [(f"{name}@tp{pc.saved_rank}", pc) for pc in pieces(full, saved_tp, tp, tp_rank)]


def load_resharded(path: str, marker: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   tp: int, tp_rank: int) -> int:
    """Collective: fill this rank's parameters and AdamW state from checkpoint ``path`` written with the
    TP size ``marker["layout"]["tp"]`` (any PP size); returns the step. The saved pieces are read into host
    memory in one DCP read. The RNG state is not restored (a rank's coordinates, and so the stream it
    would have had, differ across the change)."""
    saved_tp = int(marker["layout"]["tp"])
    reader = ckpt.VerifiedReader(path, marker["files"])
    saved = reader.read_metadata().state_dict_metadata
    reads: dict[str, torch.Tensor] = {"step": torch.zeros((), dtype=torch.int64)}
    copies: list[tuple[torch.Tensor, int | None, Piece | None, str]] = []
    """(this rank's tensor, split dim, piece or None for the whole, read key): filled after the read."""

    def want(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> str:
        md = saved.get(key)
        if md is None:
            raise ckpt.CheckpointMismatch(f"{path}: lacks {key!r}, which this run's model needs")
        if tuple(md.size) != shape:
            raise ckpt.CheckpointMismatch(f"{path}: {key!r} has shape {tuple(md.size)}, expected {shape} from "
                                          f"this model split over the checkpoint's TP {saved_tp}")
        reads[key] = torch.empty(shape, dtype=dtype)
        return key

    for name, p in model.named_parameters():
        st = optimizer.state[p]
        if not st:  # as a step would create it, then overwritten below
            st.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                      exp_avg_sq=torch.zeros_like(p))
        dim, shape, sources = _sources(name, p, saved_tp, tp, tp_rank)
        for key, pc in sources:
            for target, full_key in ((p.data, f"model/{key}"),
                                     *((st[m], f"optim/{key}/{m}") for m in MOMENTS)):
                copies.append((target, dim, pc, want(full_key, shape, target.dtype)))
        step = sources[0][0]  # AdamW's step: the same in every saved piece
        copies.append((st["step"], None, None, want(f"optim/{step}/step", (), st["step"].dtype)))
    dcp.load(reads, storage_reader=reader)
    with torch.no_grad():
        for target, dim, pc, key in copies:
            if pc is None:
                target.copy_(reads[key])
            else:
                _along(target, dim, pc.dst).copy_(_along(reads[key], dim, pc.src))
    return int(reads["step"])
