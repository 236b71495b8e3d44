"""Checkpoints with torch.distributed.checkpoint (DCP), never loaded half-written.

A save goes to ``<dir>/step_<N>.tmp``; after every rank has written its shards, rank 0 adds a
``COMPLETE`` marker and renames the directory to ``step_<N>``. :func:`latest` only considers
``step_<N>`` directories holding the marker, so a run killed mid-save leaves a ``.tmp`` directory (or
nothing) that is ignored and cleaned up by the next save.

State keys: model parameters and their AdamW moments by parameter name (layers carry their global index,
so names do not depend on the pipeline split), with ``@tp<r>`` appended for TP-sharded ones; tensors
replicated over DP×SP (and over TP when not sharded) share a key and DCP writes them once; the RNG state
is kept per global rank. Resume with the same parallel layout to continue exactly.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


def _key(name: str, p: torch.Tensor, tp_rank: int) -> str:
    return f"{name}@tp{tp_rank}" if getattr(p, "tensor_model_parallel", False) else name


def training_state(model, optimizer, step: int, tp_rank: int, rank: int, materialize: bool = False) -> dict:
    """Flat dict of tensors to save, or (materialize=True) to load into: missing AdamW state is created
    as zeros so DCP can load in place."""
    state = {"step": torch.tensor(step, dtype=torch.int64)}
    for name, p in model.named_parameters():
        k = _key(name, p, tp_rank)
        state[f"model/{k}"] = p.data
        st = optimizer.state[p]
        if materialize and not st:
            st.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                      exp_avg_sq=torch.zeros_like(p))
        for s in ("step", "exp_avg", "exp_avg_sq"):
            if s in st:
                state[f"optim/{k}/{s}"] = st[s]
    state[f"rng/cpu/rank{rank}"] = torch.random.get_rng_state()
    if torch.cuda.is_available():
        state[f"rng/cuda/rank{rank}"] = torch.cuda.get_rng_state()
    return state


def save(ckpt_dir: str, step: int, state: dict, keep: int = 2) -> str:
    """Collective: write ``state`` for ``step`` and publish it atomically. Returns the final path."""
    rank = dist.get_rank()
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(state, checkpoint_id=tmp)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"step": step, "world_size": dist.get_world_size()}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(ckpt_dir, keep)
    dist.barrier()
    return final


def _prune(ckpt_dir: str, keep: int) -> None:
    complete = _complete(ckpt_dir)
    for _, path in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(ckpt_dir):  # leftovers of killed saves
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def _complete(ckpt_dir: str) -> list[tuple[int, str]]:
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest(ckpt_dir: str) -> str | None:
    """Newest complete checkpoint directory, or None."""
    c = _complete(ckpt_dir)
    return c[-1][1] if c else None


def load(path: str, state: dict) -> int:
    """Collective: load ``path`` into ``state`` in place, restore this rank's RNG; returns the step."""
    dcp.load(state, checkpoint_id=path)
    for k, v in state.items():
        if k.startswith("rng/cpu/"):
            torch.random.set_rng_state(v)
        elif k.startswith("rng/cuda/"):
            torch.cuda.set_rng_state(v)
    return int(state["step"])
