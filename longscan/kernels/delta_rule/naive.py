"""Recurrent reference for the delta rule (the ground truth for every delta-rule test).

    S_t = (I - β_t k_t k_tᵀ) D_t S_{t-1} + β_t k_t v_tᵀ        o_t = scale · S_tᵀ q_t
with D_t = I (no gate), exp(g_t)·I (g `[B, T, H]`, Gated DeltaNet) or Diag(exp(g_t)) (g `[B, T, H, K]`, KDA).

Token by token, in whatever dtype the inputs have (tests use float64); autograd gives the gradients.
"""
from __future__ import annotations

import torch


def naive_recurrent_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False):
    """q, k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]`, g None, `[B, T, H]` or `[B, T, H, K]` ->
    (o `[B, T, H, V]` in q's dtype, final state `[B, H, K, V]` in q's dtype, or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    decay = None
    if g is not None:   # as a per-key factor `[B, T, H, K]`
        decay = (g.unsqueeze(-1) if g.dim() == 3 else g).to(dtype).exp().expand(B, T, H, K)
    outs = []
    for t in range(T):
        if decay is not None:
            S = S * decay[:, t].unsqueeze(-1)
        k_t, v_t, b_t = k[:, t].to(dtype), v[:, t].to(dtype), beta[:, t].to(dtype)
        # S += β k (v - Sᵀk)ᵀ: remove what the state predicts for k, then write v
        err = v_t - torch.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + (b_t.unsqueeze(-1) * k_t).unsqueeze(-1) * err.unsqueeze(-2)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t].to(dtype)))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(q.dtype), (S if output_final_state else None)
