"""The model's one entry to attention: the SP operators of ``longscan.parallel`` when the SP group has
more than one rank, the single-device kernels otherwise (same maths, no communication)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longscan.distributed.layouts import group_rank_size
from longscan.kernels.linear_attention import chunk_linear_attention


def _sp_size(group) -> int:
    return group_rank_size(group)[1] if group is not None else 1


def linear_attention(q, k, v, g=None, g_gamma=None, *, method="zeco", group=None, layout="contiguous",
                     backend="auto", overlap=False, options=None, cu_seqlens=None):
    """q, k `[B, T, H, K]`, v `[B, T, H, V]` (T local) -> o `[B, T, H, V]`. options: the Triton kernels'
    LinearKernelOptions (None: the defaults).

    ``cu_seqlens``: packed documents, one global offsets tensor per batch row (each row attended alone)."""
    if cu_seqlens is not None:
        if len(cu_seqlens) != q.shape[0]:
            raise ValueError(f"cu_seqlens needs one offsets tensor per batch row ({q.shape[0]}), got {len(cu_seqlens)}")
        return torch.cat([_linear(q[b:b + 1], k[b:b + 1], v[b:b + 1], g[b:b + 1] if g is not None else None, g_gamma,
                                  method, group, layout, backend, overlap, options, cu)
                          for b, cu in enumerate(cu_seqlens)])
    return _linear(q, k, v, g, g_gamma, method, group, layout, backend, overlap, options, None)


def _linear(q, k, v, g, g_gamma, method, group, layout, backend, overlap, options, cu_seqlens):
    """The SP operator, or the local kernel on one rank."""
    if _sp_size(group) == 1:
        return chunk_linear_attention(q, k, v, g=g, g_gamma=g_gamma, backend=backend, options=options,
                                      cu_seqlens=cu_seqlens)[0]
    from longscan.parallel import linear_attention as sp_linear
    return sp_linear(q, k, v, g=g, g_gamma=g_gamma, method=method, group=group, layout=layout,
                     backend=backend, overlap=overlap, options=options, cu_seqlens=cu_seqlens)[0]


def softmax_attention(q, k, v, *, method="ring", group=None, layout="zigzag", backend="auto", cu_seqlens=None):
    """Causal softmax attention; q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` (T local) -> `[B, T, Hq, D]`.

    ``cu_seqlens``: packed documents, one global offsets tensor per batch row (each row attended alone)."""
    if cu_seqlens is not None:
        if len(cu_seqlens) != q.shape[0]:
            raise ValueError(f"cu_seqlens needs one offsets tensor per batch row ({q.shape[0]}), got {len(cu_seqlens)}")
        return torch.cat([_documents(q[b:b + 1], k[b:b + 1], v[b:b + 1], cu, method, group, layout, backend)
                          for b, cu in enumerate(cu_seqlens)])
    if _sp_size(group) == 1:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)
    try:
        from longscan.parallel.softmax import softmax_attention as sp_softmax
    except ImportError as e:
        raise RuntimeError("softmax SP needs longscan.parallel.softmax, which is not importable here: "
                           f"{e}") from e
    return sp_softmax(q, k, v, causal=True, method=method, group=group, layout=layout, backend=backend)


def _documents(q, k, v, cu_seqlens, method, group, layout, backend):
    """One row `[1, T, H, D]` of packed documents: the SP operator, or the local kernel on one rank."""
    if _sp_size(group) == 1:
        from longscan.kernels.softmax_attention import attention
        return attention(q, k, v, causal=True, backend=backend, cu_seqlens=cu_seqlens)
    from longscan.parallel.softmax import softmax_attention as sp_softmax
    return sp_softmax(q, k, v, causal=True, method=method, group=group, layout=layout, backend=backend,
                      cu_seqlens=cu_seqlens)
