"""RMSNorm, whole-vector and per head."""
from __future__ import annotations

import torch
from torch import nn


class _RMSNorm(torch.autograd.Function):
    """Keeps x and 1/rms for the backward, not the normalised x (a tensor the size of x fewer per norm)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return (xf * r * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        y = x.float() * r
        g = grad.float()
        dw = (g * y).sum_to_size(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gy = g * weight.float()
        dx = (r * (gy - y * (gy * y).mean(-1, keepdim=True))).to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[..., D]` normalised over D in float32, scaled by ``weight`` (broadcast), cast back."""
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; weight `[D]` replicated across TP ranks (its inputs are replicated)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class HeadRMSNorm(nn.Module):
    """Output normalisation of linear attention (TransNormer's NormAttention), per head.

    x `[B, T, H, V]`; weight `[H, V]` holds this TP rank's heads only, so it is TP-sharded like the heads
    (a shared `[V]` weight would get a different gradient on each TP rank).
    """

    def __init__(self, n_heads: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, dim))
        self.weight.tensor_model_parallel = True  # counted once per TP shard in the gradient norm
        self.weight.partition_dim = 0

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)
