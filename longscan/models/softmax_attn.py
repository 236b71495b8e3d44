"""Softmax attention token mixer: causal, RoPE at the layout's global positions, GQA, heads split over TP."""
from __future__ import annotations

from torch import nn

from longscan.models import sp_ops
from longscan.models.rope import apply_rope
from longscan.models.tp import column, row


class SoftmaxAttention(nn.Module):
    """x `[B, T, D]` (T local), cos/sin `[T, head_dim]` -> `[B, T, D]`."""

    def __init__(self, cfg, mp, tp_size: int, sp):
        super().__init__()
        self.sp = sp
        self.hq, self.hkv, self.d = cfg.n_heads // tp_size, cfg.n_kv_heads // tp_size, cfg.hd
        self.q_proj = column(cfg.dim, cfg.n_heads * cfg.hd, mp, cfg.init_std)
        self.k_proj = column(cfg.dim, cfg.n_kv_heads * cfg.hd, mp, cfg.init_std)
        self.v_proj = column(cfg.dim, cfg.n_kv_heads * cfg.hd, mp, cfg.init_std)
        self.o_proj = row(cfg.n_heads * cfg.hd, cfg.dim, mp, cfg.init_std, cfg.n_layers)

    def forward(self, x, cos, sin, cu_seqlens=None):
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x)[0].view(B, T, self.hq, self.d), cos, sin)
        k = apply_rope(self.k_proj(x)[0].view(B, T, self.hkv, self.d), cos, sin)
        v = self.v_proj(x)[0].view(B, T, self.hkv, self.d)
        o = sp_ops.softmax_attention(q, k, v, method=self.sp.softmax_method, group=self.sp.group,
                                     layout=self.sp.layout, backend=self.sp.softmax_backend, cu_seqlens=cu_seqlens)
        return self.o_proj(o.reshape(B, T, self.hq * self.d))[0]
