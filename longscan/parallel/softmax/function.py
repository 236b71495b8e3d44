"""The one autograd Function of the softmax SP methods, parameterised by a method object.

Every method has the same outer shape: forward returns the output and its logsumexp in the compute
dtype (float32, float64 for float64 inputs; a tensor one kernel call made alone may stay in q's dtype);
the output is cast to q's dtype once and saved with the lse; backward gets that saved (o, lse) pair and
returns dq, dk, dv likewise, which are cast back to the input dtypes once. What differs (which blocks, which collectives) lives in the method's
``forward`` / ``backward`` hooks; ``attend`` is how the method runs the Function (Ulysses wraps it in
DeepSpeed's all-to-alls).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from longscan.distributed.layouts import check_layout


@dataclass(frozen=True)
class SoftmaxSPOptions:
    """What every method needs besides q, k, v; checks itself on construction."""
    scale: float
    causal: bool
    group: Optional[dist.ProcessGroup] = None   # None = the default group (or one device)
    layout: str = "zigzag"
    backend: str = "auto"             # a ``longscan.kernels.softmax_attention.BACKENDS`` name
    chunk_heads: Optional[int] = None  # kv heads per all-gather (allgather only); None = all at once
    cu_seqlens: Optional[torch.Tensor] = None  # packed documents: int64 CPU offsets into the global sequence

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {type(self.causal).__name__}")
        if not isinstance(self.scale, numbers.Real) or isinstance(self.scale, bool) or self.scale <= 0:
            raise ValueError(f"scale must be a positive number or None, got {self.scale!r}")
        check_layout(self.layout)
        if self.chunk_heads is not None and (not isinstance(self.chunk_heads, int)
                                             or isinstance(self.chunk_heads, bool) or self.chunk_heads < 1):
            raise ValueError(f"chunk_heads must be a positive int (kv heads per all-gather) or None, "
                             f"got {self.chunk_heads!r}")


class SoftmaxSPMethod(Protocol):
    """A softmax SP method: its name, its own input checks and its forward/backward hooks."""
    name: str

    def check(self, q: torch.Tensor, k: torch.Tensor, world: int, opts: SoftmaxSPOptions) -> None:
        """Raise a ValueError naming the parameter when this method cannot run these inputs."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                opts: SoftmaxSPOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out `[B, T, Hq, D]`, lse `[B, Hq, T]`) in the compute dtype."""

    def backward(self, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, opts: SoftmaxSPOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (dq, dk, dv) in the compute dtype (dk/dv with the Hkv heads of k/v)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: SoftmaxSPOptions) -> torch.Tensor:
        """Run :class:`SoftmaxSPFunction` with this method -> o `[B, T, Hq, D]` in q's dtype."""


class SoftmaxSPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, method: SoftmaxSPMethod, opts: SoftmaxSPOptions):
        out, lse = method.forward(q, k, v, opts)
        o = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.method, ctx.opts = method, opts
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.method.backward(do, q, k, v, o, lse, ctx.opts)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
