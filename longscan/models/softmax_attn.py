"""Softmax attention token mixer: causal, RoPE at the layout's global positions, GQA, heads split over TP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from torch import nn

from longscan.models import sp_ops
from longscan.models.norms import RMSNorm, rms_norm
from longscan.models.rope import apply_rope
from longscan.models.tiling import tiled
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

    def tiled_with_norm(self, x: torch.Tensor, norm: RMSNorm, cos, sin, tile: int, cu_seqlens=None) -> torch.Tensor:
        """self(norm(x), cos, sin) with the norm and the q/k/v projections run ``tile`` tokens at a time (the
        `[T, D]` norm output and RoPE's float32 temporaries live for one tile) and the output projection
        likewise. The TP collectives run once, outside the tiles."""
        B, T, _ = x.shape
        group = self.q_proj.tp_group
        x = copy_to_tensor_model_parallel_region(x, group=group)
        nw = copy_to_tensor_model_parallel_region(norm.weight, group=group)

        def pre(xt, ct, st, nw_, wq, wk, wv):
            n = rms_norm(xt, nw_, norm.eps)
            t = xt.shape[1]
            return (apply_rope(F.linear(n, wq).view(B, t, self.hq, self.d), ct, st),
                    apply_rope(F.linear(n, wk).view(B, t, self.hkv, self.d), ct, st),
                    F.linear(n, wv).view(B, t, self.hkv, self.d))
        tables = [c if c.dim() == 3 else c[None] for c in (cos, sin)]  # [B or 1, T, head_dim]: tiled along T
        q, k, v = tiled(pre, x, (nw, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight), tile, tables)
        o = sp_ops.softmax_attention(q, k, v, method=self.sp.softmax_method,
                                     group=self.sp.group, layout=self.sp.layout, backend=self.sp.softmax_backend,
                                     cu_seqlens=cu_seqlens)
        y = tiled(lambda ot, wo: F.linear(ot.flatten(2), wo), o, (self.o_proj.weight,), tile)
        return reduce_from_tensor_model_parallel_region(y, group=group)
