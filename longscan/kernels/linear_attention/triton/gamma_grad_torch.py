"""A learnable g_gamma's forward-mode gradient (gamma_grad.py: the math, and why not the per-token sum) in torch
operators, for float32 inputs on CUDA: there gamma_grad.py's kernel faulted (an illegal address, Triton 3.6 on
an H100), where this form holds the gradient within 7.5e-6 of float64 in every float32 case of the accuracy grid
(72 of 72, H100).

S and D over the chunks are two runs of the segment scan (state.py's, every chunk a segment); D after the last
chunk meets dht. Everything runs in float32 (torch's float32 matmuls, TF32 off by default), heads in groups so
the per-chunk states `[B, heads, chunks, K, V]` stay bounded.
"""
from __future__ import annotations

import torch

from longscan.kernels.linear_attention.triton.state import _scan

CHUNK = 64
MAX_STATE_ELEMENTS = 2 ** 26   # floats in one [B, heads, chunks, K, V] buffer of a head group (256 MB)


def g_gamma_grad_torch(q, k, v, g_gamma, scale: float, initial_state, do, dht,
                       max_state_elements: int = MAX_STATE_ELEMENTS) -> torch.Tensor:
    """gamma_grad.g_gamma_grad's result (dL/dg_gamma `[H]` float32) in torch operators; heads in groups of at
    most max_state_elements floats a per-chunk state buffer (at least one head)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    n_chunks = -(-T // CHUNK)
    group = max(1, max_state_elements // max(1, B * n_chunks * K * V))
    out = torch.zeros(H, device=q.device, dtype=torch.float32)
    if T == 0:      # no token: the state leaves as it entered, whatever the decay
        return out
    for h in range(0, H, group):
        hs = slice(h, min(H, h + group))
        out[hs] = _heads(q[:, :, hs], k[:, :, hs], v[:, :, hs], g_gamma[hs], scale,
                         None if initial_state is None else initial_state[:, hs],
                         do[:, :, hs], None if dht is None else dht[:, hs])
    return out


def _heads(q, k, v, g_gamma, scale, h0, do, dht) -> torch.Tensor:
    B, T, H, K = q.shape
    C = CHUNK
    n = -(-T // C)
    dev, f32 = q.device, torch.float32

    def chunks(x):   # [B, T, H, D] -> [B, H, n, C, D] float32, zeros past T
        x = x.to(f32)
        if n * C != T:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * C - T))
        return x.reshape(B, n, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, kc, vc, dc = chunks(q), chunks(k), chunks(v), chunks(do)
    # a head that forgets everything (−inf) has gradient 0, the limit that a large finite decay gives (−inf · 0
    # would be NaN at the weights of distance 0)
    gam = g_gamma.to(f32).clamp(min=-1e4).view(1, H, 1, 1)
    j = torch.arange(C, device=dev, dtype=f32)
    length = torch.full((n,), float(C), device=dev, dtype=f32)
    length[-1] = T - (n - 1) * C
    to_end = (length[:, None] - 1 - j).clamp(min=0)                       # [n, C]: L−1−j (0 on padding)
    w_end = torch.exp(gam * to_end)                                       # [1, H, n, C]
    local = (kc * w_end[..., None]).transpose(-1, -2) @ vc                # [B, H, n, K, V]
    local_d = (kc * (w_end * to_end)[..., None]).transpose(-1, -2) @ vc
    chunk_log = (gam.view(1, H, 1) * length).expand(B, H, n)
    log_decay = chunk_log[..., None].expand(B, H, n, K).contiguous()
    init = None if h0 is None else h0.to(f32).contiguous()
    S, _ = _scan(local.contiguous(), log_decay, init, reverse=False)     # S entering each chunk
    del local
    grow = (torch.exp(chunk_log) * length)[..., None, None]               # α^L·L
    D, D_end = _scan((grow * S + local_d).contiguous(), log_decay, None, reverse=False)
    del local_d
    at = torch.exp(gam * (j + 1))                                         # [1, H, 1, C]
    inter = ((qc @ D + (j + 1)[:, None] * (qc @ S)) * dc).sum(-1) * at  # [B, H, n, C]
    dist = (j[:, None] - j[None, :]).clamp(min=0)                         # u − s on and below the diagonal
    weight = dist * torch.exp(gam[..., None] * dist)                      # 0 on the diagonal and above
    intra = ((qc @ kc.transpose(-1, -2)) * (dc @ vc.transpose(-1, -2)) * weight).sum((-1, -2))
    grad = scale * (inter.sum((2, 3)) + intra.sum(2))                     # [B, H]
    if dht is not None:
        grad = grad + (dht.to(f32) * D_end).sum((-1, -2))
    return grad.sum(0)
