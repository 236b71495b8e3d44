"""Sequence-parallel softmax attention: one entry point over three methods, one file per method.

    softmax_attention(q, k, v, causal=True, scale=None, method="ring", group=None, layout="zigzag",
                      backend="auto", chunk_heads=None, cu_seqlens=None) -> o

q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` are this rank's shard (T = local length) in ``layout``
(``longscan.distributed.layouts``); o `[B, T, Hq, D]` is this rank's shard of the output. GQA when Hkv
divides Hq. Methods (each an object with forward/backward hooks of the one autograd Function in
``function.py``, registered by its name in :data:`METHODS`):
- "ring" (ring.py): K/V travel the ring with async P2P, overlapped with the local block's attention.
- "allgather" (allgather.py): LASP-2H — all-gather K/V (``chunk_heads`` kv heads at a time),
  reduce-scatter dK/dV.
- "ulysses" (ulysses.py): DeepSpeed all-to-all to head sharding and back (optional extra).
``backend`` picks the local kernel (``longscan.kernels.softmax_attention``).
``cu_seqlens`` (packed documents, fla's convention): int32/int64 `[N + 1]` offsets into the *global*
sequence (0 .. W·T), the same on every rank; needs B = 1. No query attends across a document boundary;
documents of any length, anywhere (``longscan.distributed.documents``).
"""
from __future__ import annotations

import torch

from longscan.distributed.checks import check_softmax_call
from longscan.distributed.documents import checked_cu_seqlens
from longscan.distributed.layouts import group_rank_size
from longscan.kernels.softmax_attention import check_qkv, resolve_backend
from longscan.parallel.softmax.allgather import AllGather
from longscan.parallel.softmax.function import SoftmaxSPFunction, SoftmaxSPMethod, SoftmaxSPOptions
from longscan.parallel.softmax.ring import Ring
from longscan.parallel.softmax.ulysses import Ulysses

REGISTRY: dict[str, SoftmaxSPMethod] = {m.name: m for m in (Ring(), AllGather(), Ulysses())}
METHODS = tuple(REGISTRY)

__all__ = ["softmax_attention", "METHODS", "REGISTRY", "SoftmaxSPOptions", "SoftmaxSPMethod",
           "SoftmaxSPFunction"]


def _method(name) -> SoftmaxSPMethod:
    if name not in REGISTRY:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    return REGISTRY[name]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale=None,
                      method: str = "ring", group=None, layout: str = "zigzag", backend: str = "auto",
                      chunk_heads=None, cu_seqlens=None) -> torch.Tensor:
    """SP softmax attention over ``group`` (default: the world); see the module docstring. Every rank of the
    group must make the same call: checked on every call, with an error naming what differs on which ranks."""
    check_softmax_call(group, q, k, v, causal, scale, method, layout, chunk_heads, cu_seqlens)
    check_qkv(q, k, v)
    _, world = group_rank_size(group)
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs documents into one sequence: q must be [1, T, H, D], got batch "
                             f"{q.shape[0]}")
        # checked once per tensor: the layers of a step then pass one CPU copy, which their documents are cached on
        cu_seqlens = checked_cu_seqlens(cu_seqlens, q.shape[1] * world)
    resolved = resolve_backend(backend, q, cu_seqlens is not None)
    if cu_seqlens is not None:
        backend = resolved      # every call of packed documents on one backend, those within one document too
    opts = SoftmaxSPOptions(scale=q.shape[-1] ** -0.5 if scale is None else scale, causal=causal, group=group,
                            layout=layout, backend=backend, chunk_heads=chunk_heads, cu_seqlens=cu_seqlens)
    impl = _method(method)
    if q.shape[1] == 0:
        raise ValueError("q must hold at least one token (q.shape[1] == 0)")
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"layout='zigzag' needs an even local length (two pieces per rank), got q.shape[1] = "
                         f"{q.shape[1]}")
    if chunk_heads is not None and impl.name != AllGather.name:
        raise ValueError(f"chunk_heads only applies to method={AllGather.name!r}, got method={method!r}")
    impl.check(q, k, world, opts)
    return impl.attend(q, k, v, opts)
