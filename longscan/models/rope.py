"""Rotary position embedding at explicit global positions (zigzag positions are not 0..T-1)."""
from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """positions `[T]` (or `[B, T]`, e.g. per document) int -> cos, sin `[T, head_dim]` (`[B, T, head_dim]`)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, T, H, D]` rotated (rotate-half convention, as Llama), computed in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    # [T, D] tables are shared by the batch; [B, T, D] ones are per row
    c, s = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    return (xf * c + rot * s).to(x.dtype)
