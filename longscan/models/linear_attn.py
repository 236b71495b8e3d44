"""Linear-attention token mixer with the four decay kinds (docs/design.md, "Tensor conventions").

- ``linear``: no decay; q, k through SiLU; output RMS-normalised per head (TransNormer's NormAttention).
- ``lightning``: constant per-head decay, a fixed buffer g_gamma `[H]` = log(1 - 2^(-5-h)) (RetNet's
  rates), over the *global* head index h so every TP split sees the same decays.
- ``simple_gla``: data-dependent scalar gate g `[B, T, H]` = logsigmoid(x W_g) / normalizer.
- ``gla``: per-key gate g `[B, T, H, K]` = logsigmoid(x W_g) / normalizer.
All four normalise the output per head before the output projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longscan.models import sp_ops
from longscan.models.norms import HeadRMSNorm
from longscan.models.tp import column, row


def lightning_log_decay(n_heads: int) -> torch.Tensor:
    """g_gamma `[H]` for all heads (float32, negative)."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(n_heads, dtype=torch.float64))).float()


class LinearAttention(nn.Module):
    """x `[B, T, D]` (T local to the SP rank) -> `[B, T, D]`; heads split across TP."""

    def __init__(self, cfg, mp, tp_rank: int, tp_size: int, sp):
        super().__init__()
        self.variant, self.sp = cfg.linear_variant, sp
        self.h, self.d = cfg.n_heads // tp_size, cfg.hd
        self.normalizer = cfg.gate_logit_normalizer
        inner = cfg.n_heads * cfg.hd
        self.q_proj = column(cfg.dim, inner, mp, cfg.init_std)
        self.k_proj = column(cfg.dim, inner, mp, cfg.init_std)
        self.v_proj = column(cfg.dim, inner, mp, cfg.init_std)
        if self.variant == "simple_gla":
            self.g_proj = column(cfg.dim, cfg.n_heads, mp, cfg.init_std)
        elif self.variant == "gla":
            self.g_proj = column(cfg.dim, inner, mp, cfg.init_std)
        if self.variant == "lightning":
            decay = lightning_log_decay(cfg.n_heads)[tp_rank * self.h:(tp_rank + 1) * self.h]
            self.register_buffer("g_gamma", decay.clone(), persistent=False)
        self.out_norm = HeadRMSNorm(self.h, self.d, cfg.norm_eps)
        self.o_proj = row(inner, cfg.dim, mp, cfg.init_std, cfg.n_layers)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x)[0].view(B, T, self.h, self.d)
        k = self.k_proj(x)[0].view(B, T, self.h, self.d)
        v = self.v_proj(x)[0].view(B, T, self.h, self.d)
        g = g_gamma = None
        if self.variant in ("linear", "lightning"):
            q, k = F.silu(q), F.silu(k)  # positive features keep the un-normalised sums well behaved
        if self.variant == "lightning":
            g_gamma = self.g_gamma
        elif self.variant == "simple_gla":
            g = F.logsigmoid(self.g_proj(x)[0].float()) / self.normalizer
        elif self.variant == "gla":
            g = F.logsigmoid(self.g_proj(x)[0].float().view(B, T, self.h, self.d)) / self.normalizer
        # g stays float32 under bf16 autocast: log decays summed over thousands of tokens need the precision
        o = sp_ops.linear_attention(q, k, v, g=g, g_gamma=g_gamma, method=self.sp.linear_method,
                                    group=self.sp.group, layout=self.sp.layout, backend=self.sp.linear_backend,
                                    overlap=self.sp.linear_overlap)
        o = self.out_norm(o.to(x.dtype))
        return self.o_proj(o.reshape(B, T, self.h * self.d))[0]
