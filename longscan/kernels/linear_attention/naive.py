"""Recurrent reference for linear attention with diagonal decay (the ground truth for every test).

    S_t = exp(g_t) ⊙ S_{t-1} + k_t v_tᵀ        (decay broadcast over V)
    o_t = scale · q_tᵀ S_t

Token by token, in whatever dtype the inputs have (tests use float64); autograd gives the gradients.
"""
from __future__ import annotations

import torch


def expand_gate(g, g_gamma, B: int, T: int, H: int, K: int, dtype, device) -> torch.Tensor | None:
    """Any decay kind as a per-key log gate `[B, T, H, K]` (None when there is no decay)."""
    if g_gamma is not None:
        return g_gamma.to(dtype).view(1, 1, H, 1).expand(B, T, H, K)
    if g is None:
        return None
    if g.dim() == 3:
        return g.to(dtype).unsqueeze(-1).expand(B, T, H, K)
    return g.to(dtype)


def naive_recurrent_linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                                     output_final_state=False):
    """q, k `[B, T, H, K]`; v `[B, T, H, V]` -> (o `[B, T, H, V]`, final state `[B, H, K, V]` or None).

    Computes in the dtype of q (float64 inputs give a float64 reference); o is returned in q's dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    scale = K ** -0.5 if scale is None else scale
    gk = expand_gate(g, g_gamma, B, T, H, K, dtype, q.device)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    outs = []
    for t in range(T):
        if gk is not None:
            S = S * gk[:, t].exp().unsqueeze(-1)
        S = S + k[:, t].to(dtype).unsqueeze(-1) * v[:, t].to(dtype).unsqueeze(-2)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].to(dtype), S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(q.dtype), (S if output_final_state else None)
