"""RoPE in eager torch: the arithmetic the Triton kernels implement (float32, or float64 for float64 inputs)."""
from __future__ import annotations

import torch


def _wide(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(like.dtype, torch.float32))


def _tables(cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor):
    # [T, D] tables are shared by the batch; [B, T, D] ones are per row; both broadcast over the heads
    c, s = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    return _wide(c, x), _wide(s, x)


def forward(x, cos, sin):
    """-> x · cos + rotate_half(x) · sin in x's dtype, rotate_half([x1, x2]) = [-x2, x1]."""
    xf = _wide(x, x)
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = _tables(cos, sin, x)
    return (xf * c + torch.cat([-x2, x1], dim=-1) * s).to(x.dtype)


def backward(grad, cos, sin):
    """-> the input's gradient: grad · cos + rotate_half^T(grad · sin), rotate_half^T([z1, z2]) = [z2, -z1]."""
    g = _wide(grad, grad)
    c, s = _tables(cos, sin, grad)
    z1, z2 = (g * s).chunk(2, dim=-1)
    return (g * c + torch.cat([z2, -z1], dim=-1)).to(grad.dtype)
