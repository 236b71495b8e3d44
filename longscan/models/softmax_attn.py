"""Softmax attention token mixer: causal, RoPE at the layout's global positions, GQA, heads split over TP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from torch import nn

from longscan.distributed.layouts import group_rank_size
from longscan.models import sp_ops
from longscan.models.norms import RMSNorm, rms_norm
from longscan.models.rope import apply_rope
from longscan.models.tiling import head_groups, tiled
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

    def head_grouped(self, x: torch.Tensor, norm: RMSNorm, cos, sin, groups: int, tile: int = 0,
                     cu_seqlens=None) -> torch.Tensor:
        """self(norm(x), cos, sin) with this rank's KV heads run ``groups`` at a time, each with its query heads
        (GQA): for each group the norm, its rows of the q/k/v projections, RoPE, the attention over the whole
        sequence and its columns of the output projection, summed into the output. Kept for the backward: x
        (and RoPE's tables) only; one group's q, k, v, output, log-sum-exp and their gradients are alive at
        once, recomputed group by group in the backward. ``tile`` (tokens, 0: the whole sequence): the
        token-wise parts run that many tokens at a time, as with mixer_tile. The TP collectives run once,
        outside the groups; the SP operator runs once per group on its heads. The output is float32 (the
        groups' sum; float64 for float64 inputs)."""
        if groups < 1 or self.hkv % groups:
            raise ValueError(f"memory.mixer_head_groups = {groups} must divide the KV heads per TP rank "
                             f"({self.hkv}) of a softmax mixer")
        nq, nkv, d, group = self.hq // groups, self.hkv // groups, self.d, self.q_proj.tp_group
        world = group_rank_size(self.sp.group)[1] if self.sp.group is not None else 1
        if self.sp.softmax_method == "ulysses" and world > 1 and nkv % world:
            raise ValueError(f"memory.mixer_head_groups = {groups} leaves {nkv} KV heads a group, which "
                             f"softmax_method='ulysses' cannot shard over the SP group of {world} (it needs "
                             "heads divisible by the SP size)")
        x = copy_to_tensor_model_parallel_region(x, group=group)
        nw = copy_to_tensor_model_parallel_region(norm.weight, group=group)

        def pre(j, xt, ct, st, nw_, wq, wk, wv, wo):
            n, (B, t) = rms_norm(xt, nw_, norm.eps), xt.shape[:2]
            q = F.linear(n, wq[j * nq * d:(j + 1) * nq * d]).view(B, t, nq, d)
            k = F.linear(n, wk[j * nkv * d:(j + 1) * nkv * d]).view(B, t, nkv, d)
            v = F.linear(n, wv[j * nkv * d:(j + 1) * nkv * d]).view(B, t, nkv, d)
            return apply_rope(q, ct, st), apply_rope(k, ct, st), v

        def mid(j, q, k, v):  # kv head i serves query heads i·hq/hkv .. : a group's query heads are contiguous
            return sp_ops.softmax_attention(q, k, v, method=self.sp.softmax_method, group=self.sp.group,
                                            layout=self.sp.layout, backend=self.sp.softmax_backend,
                                            cu_seqlens=cu_seqlens)

        def post(j, ot, nw_, wq, wk, wv, wo):
            return F.linear(ot.flatten(2), wo[:, j * nq * d:(j + 1) * nq * d])
        tables = [c if c.dim() == 3 else c[None] for c in (cos, sin)]  # [B or 1, T, head_dim]: tiled along T
        params = (nw, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight)
        y = head_groups(pre, mid, post, x, params, groups, tile or x.shape[1], tables)
        return reduce_from_tensor_model_parallel_region(y, group=group)
