"""Sequence-parallel softmax attention: one entry point over three methods, one file per method.

    softmax_attention(q, k, v, causal=True, scale=None, method="ring", group=None, layout="zigzag",
                      backend="auto", chunk_heads=None) -> o

q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` are this rank's shard (T = local length) in ``layout``
(``longscan.distributed.layouts``); o `[B, T, Hq, D]` is this rank's shard of the output. GQA when Hkv
divides Hq. Methods:
- "ring" (ring.py): K/V travel the ring with async P2P, overlapped with the local block's attention.
- "allgather" (allgather.py): LASP-2H — all-gather K/V (``chunk_heads`` kv heads at a time),
  reduce-scatter dK/dV.
- "ulysses" (ulysses.py): DeepSpeed all-to-all to head sharding and back (optional extra).
``backend`` picks the local kernel (``longscan.kernels.softmax_attention``).
"""
from __future__ import annotations

import numbers

import torch

from longscan.distributed.checks import check_softmax_call
from longscan.distributed.layouts import check_layout, group_rank_size
from longscan.kernels.softmax_attention import check_qkv, resolve_backend
from longscan.parallel.softmax.allgather import allgather_attention
from longscan.parallel.softmax.ring import ring_attention
from longscan.parallel.softmax.ulysses import check_heads, ulysses_attention

METHODS = ("ring", "allgather", "ulysses")

__all__ = ["softmax_attention", "METHODS", "ring_attention", "allgather_attention", "ulysses_attention"]


def _check_args(q, k, v, causal, scale, method, group, layout, backend, chunk_heads):
    check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool) or scale <= 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_layout(layout)
    resolve_backend(backend, q)
    _, world = group_rank_size(group)
    if q.shape[1] == 0:
        raise ValueError("q must hold at least one token (q.shape[1] == 0)")
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"layout='zigzag' needs an even local length (two pieces per rank), got q.shape[1] = "
                         f"{q.shape[1]}")
    if chunk_heads is not None:
        if method != "allgather":
            raise ValueError(f"chunk_heads only applies to method='allgather', got method={method!r}")
        if not isinstance(chunk_heads, int) or isinstance(chunk_heads, bool) or chunk_heads < 1:
            raise ValueError(f"chunk_heads must be a positive int (kv heads per all-gather) or None, "
                             f"got {chunk_heads!r}")
    if method == "ulysses":
        check_heads(q.shape[2], k.shape[2], world)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale=None,
                      method: str = "ring", group=None, layout: str = "zigzag", backend: str = "auto",
                      chunk_heads=None) -> torch.Tensor:
    """SP softmax attention over ``group`` (default: the world); see the module docstring. Every rank of the
    group must make the same call: checked on every call, with an error naming what differs on which ranks."""
    check_softmax_call(group, q, k, v, causal, scale, method, layout, chunk_heads)
    _check_args(q, k, v, causal, scale, method, group, layout, backend, chunk_heads)
    if method == "ring":
        return ring_attention(q, k, v, causal, scale, group, layout, backend)
    if method == "allgather":
        return allgather_attention(q, k, v, causal, scale, group, layout, backend, chunk_heads)
    return ulysses_attention(q, k, v, causal, scale, group, layout, backend)
