"""The local-compute contract every linear-attention backend implements (docs/design.md).

A backend is a class with the methods of :class:`LinearBackend`. Every entry point returns what it hands on:
``forward`` and ``segment_state`` return a saved record (or None) that a later call on the same inputs may take
(``saved=``), ``prefix_grad`` the record of its own pass (``qdo=`` of the backward). Backends that keep
nothing (torch, naive, fla) return None there and ignore what they are given. ``backward`` takes ``dht`` as a
tensor, None, or a function returning either: a backend calls it as late as it can (Triton: after launching
the work that needs no dht), so SP's reverse collective runs beside that work.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from longscan.kernels.linear_attention import torch_chunk
from longscan.kernels.linear_attention.naive import naive_recurrent_linear_attention

Tensor = torch.Tensor
Dht = Tensor | None | Callable[[], Tensor | None]


@runtime_checkable
class LinearBackend(Protocol):
    """Linear attention on one device (shapes: q, k `[B, T, H, K]`, v `[B, T, H, V]`, states `[B, H, K, V]`)."""

    name: str
    # whether the backward's g_gamma gradient is accurate (the dispatch refuses a learnable g_gamma otherwise)
    supports_g_gamma_grad: bool

    def forward(self, q, k, v, g, g_gamma, scale, initial_state, output_final_state, *, keep: bool = False,
                saved=None) -> tuple:
        """-> (o, final state float32 or None, saved or None). keep: a backward follows; the record is then for
        ``backward(saved=)`` with the same inputs and initial_state. saved: ``segment_state``'s record."""

    def backward(self, q, k, v, g, g_gamma, scale, initial_state, do, dht: Dht, need_dg: bool = True, *,
                 saved=None, qdo=None) -> tuple:
        """-> (dq, dk, dv, dg shaped like g or g_gamma (None without decay or need_dg), dh0 `[B, H, K, V]`)."""

    def segment_state(self, k, v, g, g_gamma, *, q=None, keep: bool = False, zero_prefixes: bool = False) -> tuple:
        """-> (S `[B, H, K, V]` f32 from zero, log decay `[B, H, K]` f32, saved or None) for ``forward(saved=)``.
        q: the queries of that forward (its operands may be written now); keep: that forward keeps its record
        for a backward; zero_prefixes: that forward starts from zero."""

    def add_prefix(self, o, q, g, g_gamma, scale, P) -> Tensor:
        """o + scale·(q⊙exp(A))ᵀP: the output of a segment entered with state P."""

    def prefix_grad(self, q, g, g_gamma, scale, do, *, saved=None) -> tuple:
        """-> (scale·Σ_t (q_t⊙exp(A_t)) do_tᵀ `[B, H, K, V]` f32, log decay `[B, H, K]` f32, record or None for
        ``backward(qdo=)``). saved: the forward's record of these inputs."""


def resolve_dht(dht: Dht):
    """dht as a tensor or None (a function is called now)."""
    return dht() if callable(dht) else dht


def log_decay(g, g_gamma, T: int, shape_bhk, dtype, device) -> Tensor:
    """Total log decay A_T `[B, H, K]` of a sequence of T tokens (zeros without decay)."""
    if g_gamma is not None:
        return (T * g_gamma.to(dtype)).view(1, -1, 1).expand(shape_bhk).contiguous()
    if g is None:
        return torch.zeros(shape_bhk, dtype=dtype, device=device)
    total = g.to(dtype).sum(1)
    return (total.unsqueeze(-1) if g.dim() == 3 else total).expand(shape_bhk).contiguous()


class TorchBackend:
    """Chunked torch (the CPU default): gradients by autograd over a recomputed forward."""
    name = "torch"
    supports_g_gamma_grad = True

    def forward(self, q, k, v, g, g_gamma, scale, initial_state, output_final_state, *, keep=False, saved=None):
        return torch_chunk.forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state) + (None,)

    def backward(self, q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True, *, saved=None, qdo=None):
        return torch_chunk.backward(q, k, v, g, g_gamma, scale, initial_state, do, resolve_dht(dht), need_dg)

    def segment_state(self, k, v, g, g_gamma, *, q=None, keep=False, zero_prefixes=False):
        return torch_chunk.segment_state(k, v, g, g_gamma) + (None,)

    def add_prefix(self, o, q, g, g_gamma, scale, P):
        return torch_chunk.add_prefix(o, q, g, g_gamma, scale, P)

    def prefix_grad(self, q, g, g_gamma, scale, do, *, saved=None):
        dP = torch_chunk.prefix_grad(q, g, g_gamma, scale, do)
        B, T, H, K = q.shape
        return dP, log_decay(g, g_gamma, T, (B, H, K), dP.dtype, q.device), None


def _naive_forward(q, k, v, g, g_gamma, scale, h0):
    return naive_recurrent_linear_attention(q, k, v, g, g_gamma, scale, h0, output_final_state=True)


class NaiveBackend(TorchBackend):
    """The recurrent reference: token by token, gradients by autograd; the SP pieces are torch_chunk's."""
    name = "naive"

    def forward(self, q, k, v, g, g_gamma, scale, initial_state, output_final_state, *, keep=False, saved=None):
        o, S = _naive_forward(q, k, v, g, g_gamma, scale, initial_state)
        return o, (S.to(torch_chunk.compute_dtype(q)) if output_final_state else None), None

    def backward(self, q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True, *, saved=None, qdo=None):
        return torch_chunk.autograd_backward(_naive_forward, q, k, v, g, g_gamma, scale, initial_state, do,
                                             resolve_dht(dht), need_dg)
