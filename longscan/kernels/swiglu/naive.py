"""SwiGLU's elementwise stage in eager torch: the arithmetic the Triton kernels implement (float32, or float64
for float64 inputs)."""
from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def forward(a, b):
    """-> silu(a) ⊙ b in a's dtype."""
    af = _wide(a)
    return (af * torch.sigmoid(af) * _wide(b)).to(a.dtype)


def backward(a, b, grad, need_da: bool, need_db: bool):
    """-> (da, db): d/da silu(a) = σ(a)(1 + a(1 - σ(a))), d/db = silu(a); None where not needed."""
    af, g = _wide(a), _wide(grad)
    s = torch.sigmoid(af)
    da = (g * _wide(b) * s * (1 + af * (1 - s))).to(a.dtype) if need_da else None
    db = (g * af * s).to(b.dtype) if need_db else None
    return da, db
