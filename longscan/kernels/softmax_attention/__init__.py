"""Softmax attention on one device: the block contract the SP methods build on, and its one dispatch point.

Contract (what ``longscan.parallel.softmax`` asks of a backend), q `[B, Tq, Hq, D]`, k/v `[B, Tk, Hkv, D]`:

  block_forward(q, k, v, scale, mask, backend)  -> (o `[B, Tq, Hq, D]`, lse `[B, Hq, Tq]`)
  block_backward(do, q, k, v, o, lse, scale, mask, backend) -> (dq, dk, dv)   (dk/dv with Hkv heads)

``mask`` is "full" (every key visible) or "causal" (diagonal-aligned, needs Tq == Tk). o may come back
in q.dtype or wider; lse is float32 (float64 for float64 inputs). In backward, o and lse are the rows'
*final* values after merging every block; the block's probabilities exp(s - lse) are then the true
global ones, so the gradients of all blocks of a row add up to that row's full gradient.

Partial results of blocks are combined with :func:`merge_into` in float32 (float64 for float64 inputs).

Backends: "torch" (plain torch, any device, CPU default), "naive" (float64 reference), "sdpa_flash" and
"sdpa_cudnn" (torch's fused CUDA ops that return logsumexp), "triton" (``triton_flash.py``, imported
lazily), "auto" (sdpa_cudnn for fp16/bf16 on CUDA when available, else sdpa_flash; torch otherwise).
"""
from __future__ import annotations

import importlib

import torch

from longscan.kernels.checks import check_4d_float, check_like_q

from longscan.kernels.softmax_attention import naive, sdpa
from longscan.kernels.softmax_attention.naive import naive_attention, naive_backward
from longscan.kernels.softmax_attention.sdpa import compute_dtype

BACKENDS = ("auto", "torch", "naive", "sdpa_flash", "sdpa_cudnn", "triton")
MASKS = ("full", "causal")

__all__ = ["BACKENDS", "MASKS", "block_forward", "block_backward", "merge_into", "resolve_backend",
           "check_qkv", "compute_dtype", "naive_attention", "naive_backward", "attention"]


def _triton():
    try:
        return importlib.import_module("longscan.kernels.softmax_attention.triton_flash")
    except ImportError as e:
        raise ValueError(f"backend='triton' is not available here: {e}") from e


def _expand_kv(q, k, v):
    """Repeat kv heads to Hq for kernels without GQA support (the copy lives for one call only)."""
    g = q.shape[2] // k.shape[2]
    return (k, v) if g == 1 else (k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2))


def _sum_kv_groups(dk, dv, hkv):
    b, t, hq, d = dk.shape
    if hq == hkv:
        return dk, dv
    return dk.view(b, t, hkv, hq // hkv, d).sum(3), dv.view(b, t, hkv, hq // hkv, dv.shape[-1]).sum(3)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The concrete backend "auto" stands for on this tensor; validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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


def block_forward(q, k, v, scale: float, mask: str = "causal", backend: str = "torch"):
    """Attention of a q block against one k/v block -> (o, lse `[B, Hq, Tq]`)."""
    _check_mask(mask, q, k)
    causal = mask == "causal"
    backend = resolve_backend(backend, q)
    if backend == "torch":
        return sdpa.torch_forward(q, k, v, scale, causal)
    if backend == "naive":
        o, lse = naive_attention(q, k, v, scale, causal)
        dt = compute_dtype(q.dtype)
        return o.to(dt), lse.to(dt)
    if backend == "sdpa_flash":
        return sdpa.flash_forward(q, k, v, scale, causal)
    if backend == "sdpa_cudnn":
        return sdpa.cudnn_forward(q, k, v, scale, causal)
    ke, ve = _expand_kv(q, k, v)
    o, lse = _triton().flash_attn_forward(q, ke, ve, scale, causal)
    return o, lse.float()


def block_backward(do, q, k, v, o, lse, scale: float, mask: str = "causal", backend: str = "torch"):
    """Gradients of one block given the rows' final (o, lse) -> (dq, dk, dv), dk/dv with Hkv heads."""
    _check_mask(mask, q, k)
    causal = mask == "causal"
    backend = resolve_backend(backend, q)
    if backend == "torch":
        return sdpa.torch_backward(do, q, k, v, o, lse, scale, causal)
    if backend == "naive":
        return naive_backward(do, q, k, v, o, lse, scale, causal)
    if backend == "sdpa_flash":
        return sdpa.flash_backward(do, q, k, v, o, lse, scale, causal)
    if backend == "sdpa_cudnn":
        return sdpa.cudnn_backward(do, q, k, v, o, lse, scale, causal)
    ke, ve = _expand_kv(q, k, v)
    dq, dk, dv = _triton().flash_attn_backward(do, q, ke, ve, o.to(q.dtype), lse.float(), scale, causal)
    dk, dv = _sum_kv_groups(dk, dv, k.shape[2])
    return dq, dk, dv


def merge_into(out, lse, block_out, block_lse, rows=slice(None)):
    """Fold a block's partial result into the running (out, lse) of rows ``rows``, in place.

    out `[B, T, H, D]` and lse `[B, H, T]` are in the compute dtype (float32/float64); lse starts at -inf.
    Stable form: with m = logaddexp(lse, block_lse) both weights exp(lse - m), exp(block_lse - m) are
    <= 1, so blocks whose logits differ by 80 or more merge without overflow (exp(88) overflows float32).
    """
    old = lse[:, :, rows]
    new = torch.logaddexp(old, block_lse.to(lse.dtype))
    w_old = torch.exp(old - new).transpose(1, 2).unsqueeze(-1)       # [B, T, H, 1]; exp(-inf) = 0 at start
    w_new = torch.exp(block_lse.to(lse.dtype) - new).transpose(1, 2).unsqueeze(-1)
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
    def forward(ctx, q, k, v, scale, causal, backend):
        o, lse = block_forward(q, k, v, scale, "causal" if causal else "full", backend)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (scale, "causal" if causal else "full", backend)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(do, q, k, v, o, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attention(q, k, v, causal: bool = True, scale=None, backend: str = "auto"):
    """Single-device softmax attention with autograd; q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` -> o."""
    check_qkv(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _LocalAttention.apply(q, k, v, scale, causal, backend)
