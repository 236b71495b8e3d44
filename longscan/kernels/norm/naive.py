"""RMSNorm in eager torch: the arithmetic the Triton kernels implement (float32, or float64 for float64 inputs)."""
from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def forward(x, weight, eps: float, out_dtype: torch.dtype, groups: int):
    """-> (y in out_dtype, r = 1/rms `[..., 1]`)."""
    xf = _wide(x)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * r * _wide(weight)).to(out_dtype), r


def backward(x, weight, r, grad, groups: int, need_dx: bool, need_dw: bool):
    y = _wide(x) * r
    g = _wide(grad)
    dw = (g * y).sum_to_size(weight.shape).to(weight.dtype) if need_dw else None
    gy = g * _wide(weight)
    dx = (r * (gy - y * (gy * y).mean(-1, keepdim=True))).to(x.dtype) if need_dx else None
    return dx, dw
