"""Softmax attention on one device: the block contract the SP methods build on, and its one dispatch point.

Contract (what ``longscan.parallel.softmax`` asks of a backend), q `[B, Tq, Hq, D]`, k/v `[B, Tk, Hkv, D]`:

  block_forward(q, k, v, scale, mask, backend)  -> (o `[B, Tq, Hq, D]`, lse `[B, Hq, Tq]`)
  block_backward(do, q, k, v, o, lse, scale, mask, backend) -> (dq, dk, dv)   (dk/dv with Hkv heads)

``mask`` is "full" (every key visible) or "causal" (diagonal-aligned, needs Tq == Tk). ``docs`` (optional,
:class:`BlockDocs`) restricts it further to keys of the query's own document (packed documents); document ids
must not decrease along q nor along k. A row that sees no key of the block gives o = 0, lse = -inf. o may come back
in q.dtype or wider; lse is float32 (float64 for float64 inputs). In backward, o and lse are the rows'
*final* values after merging every block; the block's probabilities exp(s - lse) are then the true
global ones, so the gradients of all blocks of a row add up to that row's full gradient.

Partial results of blocks are combined with :func:`merge_into` in float32 (float64 for float64 inputs).

Backends: "torch" (plain torch, any device, CPU default), "naive" (float64 reference), "sdpa_flash" and
"sdpa_cudnn" (torch's fused CUDA ops that return logsumexp), "triton" (``triton_flash.py``, imported
lazily), "auto" (sdpa_cudnn for fp16/bf16 on CUDA when available, else sdpa_flash; torch otherwise).
With documents the sdpa ops have no mask to take them: "auto" picks "triton" on CUDA, and naming an sdpa
backend is an error.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple, Optional

import torch

from longscan.kernels.checks import check_4d_float, check_like_q

from longscan.kernels.softmax_attention import sdpa
from longscan.kernels.softmax_attention.naive import document_mask, naive_attention, naive_backward
from longscan.kernels.softmax_attention.sdpa import compute_dtype

BACKENDS = ("auto", "torch", "naive", "sdpa_flash", "sdpa_cudnn", "triton")
MASKS = ("full", "causal")

__all__ = ["BACKENDS", "MASKS", "BlockDocs", "block_forward", "block_backward", "merge_into", "merge_torch",
           "resolve_backend", "check_qkv", "compute_dtype", "naive_attention", "naive_backward", "attention"]


class BlockDocs(NamedTuple):
    """Document ids of a block's queries `[Tq]` and keys `[Tk]` (int, non-decreasing): packed documents."""
    q: torch.Tensor
    k: torch.Tensor


def _triton():
    try:
        return importlib.import_module("longscan.kernels.softmax_attention.triton_flash")
    except ImportError as e:
        raise ValueError(f"backend='triton' is not available here: {e}") from e


def resolve_backend(backend: str, q: torch.Tensor, documents: bool = False) -> str:
    """The concrete backend "auto" stands for on this tensor (with packed documents if ``documents``);
    validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if documents:
        if backend in ("sdpa_flash", "sdpa_cudnn"):
            raise ValueError(f"backend={backend!r} cannot mask packed documents (cu_seqlens); use 'triton', "
                             f"'torch' or 'auto'")
        if backend == "auto":
            return "triton" if q.device.type == "cuda" else "torch"
    if backend != "auto":
        if backend in ("sdpa_flash", "sdpa_cudnn") and (q.device.type != "cuda"
                                                        or q.dtype not in (torch.float16, torch.bfloat16)):
            raise ValueError(f"backend={backend!r} needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}")
        return backend
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        # cuDNN's fused attention is the faster of torch's two fused kernels on Hopper (docs/benchmarks.md).
        if torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled():
            return "sdpa_cudnn"
        return "sdpa_flash"
    return "torch"


def _check_mask(mask, q, k):
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if mask == "causal" and q.shape[1] != k.shape[1]:
        raise ValueError(f"mask='causal' is diagonal-aligned and needs equal lengths, got q {q.shape[1]} "
                         f"and k {k.shape[1]}")


def block_forward(q, k, v, scale: float, mask: str = "causal", backend: str = "torch",
                  docs: Optional[BlockDocs] = None, out_dtype: Optional[torch.dtype] = None):
    """Attention of a q block against one k/v block -> (o, lse `[B, Hq, Tq]`); o in ``out_dtype`` where given
    (the Triton kernel writes it so: no pass to widen a block that later blocks merge into)."""
    _check_mask(mask, q, k)
    causal = mask == "causal"
    backend = resolve_backend(backend, q, docs is not None)
    if backend == "triton":
        # GQA in the kernel (no copy of k, v per query head)
        o, lse = _triton().flash_attn_forward(q, k, v, scale, causal, docs, out_dtype)
        return o, lse.float()
    if backend == "torch":
        o, lse = sdpa.torch_forward(q, k, v, scale, causal, docs)
    elif backend == "naive":
        dmask = None if docs is None else document_mask(docs.q.to(q.device), docs.k.to(q.device), causal)
        o, lse = naive_attention(q, k, v, scale, causal, dmask)
        dt = compute_dtype(q.dtype)
        o, lse = o.to(dt), lse.to(dt)
    elif backend == "sdpa_flash":
        o, lse = sdpa.flash_forward(q, k, v, scale, causal)
    else:
        o, lse = sdpa.cudnn_forward(q, k, v, scale, causal)
    return (o if out_dtype is None else o.to(out_dtype)), lse


def block_backward(do, q, k, v, o, lse, scale: float, mask: str = "causal", backend: str = "torch",
                   docs: Optional[BlockDocs] = None, dq_dtype: Optional[torch.dtype] = None,
                   dkv_dtype: Optional[torch.dtype] = None):
    """Gradients of one block given the rows' final (o, lse) -> (dq, dk, dv), dk/dv with Hkv heads; dq in
    ``dq_dtype`` and dk, dv in ``dkv_dtype`` where given (the Triton kernels write them so)."""
    _check_mask(mask, q, k)
    causal = mask == "causal"
    backend = resolve_backend(backend, q, docs is not None)
    if backend == "triton":
        return _triton().flash_attn_backward(do, q, k, v, o.to(q.dtype), lse.float(), scale, causal, docs,
                                             dq_dtype, dkv_dtype)
    if backend == "torch":
        dq, dk, dv = sdpa.torch_backward(do, q, k, v, o, lse, scale, causal, docs)
    elif backend == "naive":
        dmask = None if docs is None else document_mask(docs.q.to(q.device), docs.k.to(q.device), causal)
        dq, dk, dv = naive_backward(do, q, k, v, o, lse, scale, causal, dmask)
    elif backend == "sdpa_flash":
        dq, dk, dv = sdpa.flash_backward(do, q, k, v, o, lse, scale, causal)
    else:
        dq, dk, dv = sdpa.cudnn_backward(do, q, k, v, o, lse, scale, causal)
    return (dq if dq_dtype is None else dq.to(dq_dtype), *(x if dkv_dtype is None else x.to(dkv_dtype)
                                                           for x in (dk, dv)))


def merge_into(out, lse, block_out, block_lse, rows=slice(None)):
    """Fold a block's partial result into the running (out, lse) of rows ``rows``, in place.

    out `[B, T, H, D]` and lse `[B, H, T]` are in the compute dtype (float32/float64); lse starts at -inf.
    Stable form: with m = logaddexp(lse, block_lse) both weights exp(lse - m), exp(block_lse - m) are
    <= 1, so blocks whose logits differ by 80 or more merge without overflow (exp(88) overflows float32).
    float32 on CUDA takes one Triton pass (``triton_merge.py``) for these torch operators' ten.
    """
    if out.is_cuda and out.dtype == lse.dtype == torch.float32 and out.stride(-1) == 1 and lse.stride(-1) == 1:
        try:
            fused = importlib.import_module("longscan.kernels.softmax_attention.triton_merge")
        except ImportError:
            fused = None
        if fused is not None:
            fused.merge_into(out, lse, block_out, block_lse, rows)
            return
    merge_torch(out, lse, block_out, block_lse, rows)


def merge_torch(out, lse, block_out, block_lse, rows=slice(None)):
    """:func:`merge_into` in torch operators (any device and dtype)."""
    old = lse[:, :, rows]
    new = torch.logaddexp(old, block_lse.to(lse.dtype))
    # A row that has seen no key yet and sees none here (packed documents) stays at -inf with o = 0:
    # weigh against 0 there, or exp(-inf - -inf) would be nan.
    ref = new.masked_fill(torch.isinf(new), 0.0)
    w_old = torch.exp(old - ref).transpose(1, 2).unsqueeze(-1)       # [B, T, H, 1]; exp(-inf) = 0 at start
    w_new = torch.exp(block_lse.to(lse.dtype) - ref).transpose(1, 2).unsqueeze(-1)
    out[:, rows] = out[:, rows] * w_old + block_out.to(out.dtype) * w_new
    lse[:, :, rows] = new


def check_qkv(q, k, v) -> None:
    """Raise TypeError/ValueError naming the parameter when q, k, v do not fit together."""
    check_4d_float(dict(q=q, k=k, v=v), dict(q="[B, T, Hq, D]", k="[B, T, Hkv, D]", v="[B, T, Hkv, D]"))
    check_like_q(q, dict(k=k, v=v))
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k and v must be [B, T, Hkv, D] with B, T of q {tuple(q.shape[:2])} and equal heads, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head dim must equal q head dim {q.shape[3]}, got {k.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"GQA needs the kv heads of k/v ({k.shape[2]}) to divide the q heads ({q.shape[2]})")


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, backend, docs):
        o, lse = block_forward(q, k, v, scale, "causal" if causal else "full", backend, docs)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (scale, "causal" if causal else "full", backend, docs)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(do, q, k, v, o, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def attention(q, k, v, causal: bool = True, scale=None, backend: str = "auto", cu_seqlens=None):
    """Single-device softmax attention with autograd; q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` -> o.

    ``cu_seqlens`` `[N + 1]` (offsets 0 .. T): packed documents; needs B = 1. No token attends across a
    document boundary."""
    check_qkv(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    docs = None
    if cu_seqlens is not None:
        from longscan.distributed.documents import document_ids, to_device
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs documents into one sequence: q must be [1, T, H, D], got batch "
                             f"{q.shape[0]}")
        ids = to_device(document_ids(cu_seqlens, q.shape[1]), q.device)
        docs = BlockDocs(ids, ids)
    return _LocalAttention.apply(q, k, v, scale, causal, backend, docs)
