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


def _select(t: torch.Tensor, dim: int, idx: slice) -> torch.Tensor:
    return t[(slice(None),) * dim + (idx,)]


def load_resharded(path: str, marker: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   tp: int, tp_rank: int) -> int:
    """Collective: fill this rank's parameters and AdamW state from checkpoint ``path`` written with the
    TP size ``marker["layout"]["tp"]`` (any PP size); returns the step. The RNG state is not restored
    (a rank's coordinates, and so the stream it would have, differ across the change)."""
    saved_tp = int(marker["layout"]["tp"])
    reader = ckpt.VerifiedReader(path, marker["files"])
    saved = reader.read_metadata().state_dict_metadata
    reads: dict[str, torch.Tensor] = {"step": torch.zeros((), dtype=torch.int64)}
    # (local tensor, split dim, [(piece, read key)]) to copy once the read is done
    copies: list[tuple[torch.Tensor, int | None, list[tuple[Piece | None, str]]]] = []

    def want(key: str, like_shape: tuple[int, ...], dtype: torch.dtype) -> str:
        md = saved.get(key)
        if md is None:
            raise ckpt.CheckpointMismatch(f"{path}: lacks {key!r}, which this run's model needs")
        if tuple(md.size) != like_shape:
            raise ckpt.CheckpointMismatch(f"{path}: {key!r} has shape {tuple(md.size)}, expected {like_shape} "
                                          f"for TP {saved_tp}")
        reads[key] = torch.empty(like_shape, dtype=dtype)
        return key

    for name, p in model.named_parameters():
        st = optimizer.state[p]
        if not st:
            st.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                      exp_avg_sq=torch.zeros_like(p))
        dim = tp_split_dim(p)
        if dim is None:
            keys = {t: f"{pre}/{name}{suf}" for t, pre, suf in
                    (("param", "model", ""), ("exp_avg", "optim", "/exp_avg"), ("exp_avg_sq", "optim", "/exp_avg_sq"))}
            for t, k in keys.items():
                target = p.data if t == "param" else st[t]
                copies.append((target, None, [(None, want(k, tuple(p.shape), target.dtype))]))
            copies.append((st["step"], None, [(None, want(f"optim/{name}/step", (), st["step"].dtype))]))
            continue
        full = p.shape[dim] * tp
        shape = list(p.shape)
        shape[dim] = full // saved_tp
        parts = pieces(full, saved_tp, tp, tp_rank)
        for t in ("param",) + MOMENTS:
            target = p.data if t == "param" else st[t]
            suffix = "" if t == "param" else f"/{t}"
            pre = "model" if t == "param" else "optim"
            copies.append((target, dim, [(pc, want(f"{pre}/{name}@tp{pc.saved_rank}{suffix}", tuple(shape),
                                                   target.dtype)) for pc in parts]))
        step_key = f"optim/{name}@tp{parts[0].saved_rank}/step"
        copies.append((st["step"], None, [(None, want(step_key, (), st["step"].dtype))]))
    dcp.load(reads, storage_reader=reader)
    with torch.no_grad():
        for target, dim, srcs in copies:
            for pc, key in srcs:
                src = reads[key]
                if pc is None:
                    target.copy_(src)
                else:
                    _select(target, dim, pc.dst).copy_(_select(src, dim, pc.src))
    return int(reads["step"])
