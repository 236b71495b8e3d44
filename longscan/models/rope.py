"""Rotary position embedding at explicit global positions (zigzag positions are not 0..T-1)."""
from __future__ import annotations

import torch

from longscan.kernels import rope as kernels


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """positions `[T]` (or `[B, T]`, e.g. per document) int -> cos, sin `[T, head_dim]` (`[B, T, head_dim]`)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    ang = positions.float()[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, T, H, D]` rotated (rotate-half convention, as Llama), computed in float32, returned in x's dtype;
    cos/sin `[T, D]` are shared by the batch, `[B, T, D]` ones are per row (the kernels: ``longscan.kernels.rope``)."""
    return kernels.apply_rope(x, cos, sin)
