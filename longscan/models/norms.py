"""RMSNorm, whole-vector and per head (the kernels: ``longscan.kernels.norm``)."""
from __future__ import annotations

import torch
from torch import nn

from longscan.kernels import norm as kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[..., D]` normalised over D in float32, scaled by ``weight`` (broadcast). Returned in the autocast
    dtype under autocast (every consumer is a matmul that would cast it there), else in x's dtype."""
    dev = x.device.type
    out = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return kernels.rms_norm(x, weight, eps, out)


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
