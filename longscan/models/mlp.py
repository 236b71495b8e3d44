"""SwiGLU MLP, hidden units split across TP."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from longscan.models.tp import column, row


class SwiGLU(nn.Module):
    """x `[B, T, D]` -> w2(silu(w1 x) ⊙ w3 x) `[B, T, D]`; w1, w3 column-parallel, w2 row-parallel."""

    def __init__(self, cfg, mp):
        super().__init__()
        self.w1 = column(cfg.dim, cfg.ffn, mp, cfg.init_std)
        self.w3 = column(cfg.dim, cfg.ffn, mp, cfg.init_std)
        self.w2 = row(cfg.ffn, cfg.dim, mp, cfg.init_std, cfg.n_layers)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)[0]) * self.w3(x)[0])[0]
