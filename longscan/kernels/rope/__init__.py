"""Rotary position embedding (rotate-half, as Llama) in float32, rounded once to x's dtype: one Triton pass
each way on CUDA (the eager form casts, chunks, concatenates and multiplies, five passes or more), the same
arithmetic in torch elsewhere (``naive.py``).

    y = x · cos + rotate_half(x) · sin,   rotate_half([x1, x2]) = [-x2, x1]

x `[B, T, H, D]` (any strides); cos, sin `[T, D]` (shared by the batch) or `[B, T, D]` / `[1, T, D]` (per
row, e.g. positions inside packed documents). The backward is the rotation by -θ of the output's gradient;
it keeps cos and sin only. Tables that need a gradient take the eager form through autograd."""
from __future__ import annotations

import torch

from longscan.kernels.rope import naive

try:
    from longscan.kernels.rope import triton_rope as _triton
except ImportError:   # triton is an optional extra
    _triton = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_triton(x: torch.Tensor, cos: torch.Tensor) -> bool:
    return _triton is not None and x.is_cuda and x.dtype in _KERNEL_DTYPES and cos.dtype in _KERNEL_DTYPES


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be [B, T, H, D] with D even, got {tuple(x.shape)}")
    B, T, _, D = x.shape
    if cos.shape != sin.shape:
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    fits = (cos.dim() == 2 and tuple(cos.shape) == (T, D)) or \
        (cos.dim() == 3 and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (T, D))
    if not fits:
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)} do not fit x {tuple(x.shape)} (expected "
                         f"[{T}, {D}], [1, {T}, {D}] or [{B}, {T}, {D}])")


class _RoPE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, cos, sin):
        impl = _triton if _use_triton(x, cos) else naive
        ctx.save_for_backward(cos, sin)
        ctx.impl = impl
        return impl.forward(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return ctx.impl.backward(grad, cos, sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, T, H, D]` rotated by the angles whose cos/sin are given, computed in float32 (float64 for
    float64 inputs), returned in x's dtype."""
    _check(x, cos, sin)
    if cos.requires_grad or sin.requires_grad:
        return naive.forward(x, cos, sin)
    return _RoPE.apply(x, cos, sin)
