"""Input checks shared by the kernel dispatchers: errors name the parameter and what was expected."""
from __future__ import annotations

import torch


def check_4d_float(tensors: dict, dims: dict) -> None:
    """Every tensor of ``tensors`` ({name: x}) is a floating-point 4-D tensor; ``dims`` ({name: "[B, T, H, D]"})
    gives the expected layout for the message."""
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D {dims[name]}, got shape {tuple(x.shape)}")


def check_like_q(q: torch.Tensor, others: dict) -> None:
    """Every tensor of ``others`` has q's dtype and device."""
    for name, x in others.items():
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {x.device}")


def check_linear_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    """q, k `[B, T, H, K]` and v `[B, T, H, V]` of one dtype and device, as every linear-attention family takes
    them; returns (B, T, H, K, V)."""
    check_4d_float(dict(q=q, k=k, v=v), dict(q="[B, T, H, K]", k="[B, T, H, K]", v="[B, T, H, V]"))
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H of q {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    check_like_q(q, dict(k=k, v=v))
    return (*q.shape, v.shape[-1])
