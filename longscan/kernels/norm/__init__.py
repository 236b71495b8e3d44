"""RMSNorm over the last dimension, in float32, with an output dtype of its own: one Triton pass each way on
CUDA (the eager form is seven passes over the float32 residual stream forward and more backward), the same
arithmetic in torch elsewhere (``naive.py``).

    y = (x · rsqrt(mean(x²) + eps) · w).to(out_dtype)

x `[..., G, N]` or `[..., N]`; w `[G, N]` (one weight row per group, e.g. per head) or `[N]`. The backward
keeps x and the per-row 1/rms."""
from __future__ import annotations

import torch

from longscan.kernels.norm import naive

try:
    from longscan.kernels.norm import triton_rms as _triton
except ImportError:   # triton is an optional extra
    _triton = None


def _use_triton(x: torch.Tensor) -> bool:
    return _triton is not None and x.is_cuda


class _RMSNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        groups, n = (1, weight.shape[0]) if weight.dim() == 1 else tuple(weight.shape)
        if x.shape[-1] != n or (weight.dim() == 2 and (x.dim() < 2 or x.shape[-2] != groups)):
            raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} (weight is "
                             "[N] for x [..., N] or [G, N] for x [..., G, N])")
        impl = _triton if _use_triton(x) else naive
        y, r = impl.forward(x.contiguous(), weight.contiguous(), eps, out_dtype, groups)
        ctx.save_for_backward(x, weight, r)
        ctx.groups, ctx.impl = groups, impl
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        dx, dw = ctx.impl.backward(x.contiguous(), weight.contiguous(), r, grad.contiguous(), ctx.groups,
                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x normalised over its last dim in float32, scaled by ``weight``, returned in ``out_dtype`` (default: x's)."""
    return _RMSNorm.apply(x, weight, eps, out_dtype or x.dtype)
