"""SwiGLU's elementwise stage, y = silu(a) ⊙ b, in float32 with the output in the inputs' dtype: one Triton
pass each way on CUDA (eager torch writes silu(a) and keeps it for the backward beside a and b), the same
arithmetic in torch elsewhere (``naive.py``).

a, b: any equal shapes and dtypes (the MLP's `[B, T, ffn]` halves w1 x and w3 x). The backward keeps a and b
only and recomputes silu(a); non-contiguous inputs are copied to contiguous ones for the kernels."""
from __future__ import annotations

import torch

from longscan.kernels.swiglu import naive

try:
    from longscan.kernels.swiglu import triton_swiglu as _triton
except ImportError:   # triton is an optional extra
    _triton = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_triton(a: torch.Tensor) -> bool:
    return _triton is not None and a.is_cuda and a.dtype in _KERNEL_DTYPES


class _SwiGLU(torch.autograd.Function):

    @staticmethod
    def forward(ctx, a, b):
        impl = _triton if _use_triton(a) else naive
        y = impl.forward(a.contiguous(), b.contiguous())
        ctx.save_for_backward(a, b)
        ctx.impl = impl
        return y

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return ctx.impl.backward(a.contiguous(), b.contiguous(), grad.contiguous(), ctx.needs_input_grad[0],
                                 ctx.needs_input_grad[1])


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) ⊙ b computed in float32 (float64 for float64 inputs), returned in a's dtype."""
    if a.shape != b.shape:
        raise ValueError(f"swiglu: a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape")
    if a.dtype != b.dtype:
        raise ValueError(f"swiglu: a ({a.dtype}) and b ({b.dtype}) must have the same dtype")
    if a.device != b.device:
        raise ValueError(f"swiglu: a ({a.device}) and b ({b.device}) must be on the same device")
    return _SwiGLU.apply(a, b)
