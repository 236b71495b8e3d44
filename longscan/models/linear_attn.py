"""Linear-attention token mixer with the four decay kinds (docs/design.md, "Tensor conventions").

- ``linear``: no decay; q, k through SiLU; output RMS-normalised per head (TransNormer's NormAttention).
- ``lightning``: constant per-head decay, a fixed buffer g_gamma `[H]` = log(1 - 2^(-5-h)) (RetNet's
  rates), over the *global* head index h so every TP split sees the same decays.
- ``simple_gla``: data-dependent scalar gate g `[B, T, H]` = logsigmoid(x W_g) / normalizer.
- ``gla``: per-key gate g `[B, T, H, K]` = logsigmoid(x W_g) / normalizer.
- ``deltanet``, ``gated_deltanet``, ``kda``: the delta rule (longscan.kernels.delta_rule) on q, k, v through
  a short causal convolution (kernel 4, depthwise, SiLU; longscan.models.conv), q and k L2-normalised per
  head, β = sigmoid(x W_β) `[B, T, H]`; no gate, the scalar gate of ``simple_gla`` or the per-key gate of
  ``gla`` (log space, ≤ 0).
All of them normalise the output per head before the output projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from torch import nn

from longscan.distributed.layouts import group_rank_size
from longscan.kernels import delta_rule as local_delta
from longscan.models import sp_ops
from longscan.models.args import DELTA_VARIANTS
from longscan.models.conv import CONV_KERNEL, ShortConvolution
from longscan.models.norms import HeadRMSNorm, RMSNorm, rms_norm
from longscan.models.tiling import head_groups, tiled
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
        if self.variant in ("simple_gla", "gated_deltanet"):
            self.g_proj = column(cfg.dim, cfg.n_heads, mp, cfg.init_std)
        elif self.variant in ("gla", "kda"):
            self.g_proj = column(cfg.dim, inner, mp, cfg.init_std)
        if self.variant in DELTA_VARIANTS:
            if sp.linear_backend not in local_delta.BACKENDS:
                raise ValueError(f"linear_variant={self.variant!r} runs on the delta-rule backends "
                                 f"{local_delta.BACKENDS}, got linear_backend={sp.linear_backend!r}")
            self.b_proj = column(cfg.dim, cfg.n_heads, mp, cfg.init_std)
            self.q_conv, self.k_conv, self.v_conv = (
                ShortConvolution(self.h * self.d, inner, tp_rank, CONV_KERNEL) for _ in range(3))
        if self.variant == "lightning":
            decay = lightning_log_decay(cfg.n_heads)[tp_rank * self.h:(tp_rank + 1) * self.h]
            self.register_buffer("g_gamma", decay.clone(), persistent=False)
        self.out_norm = HeadRMSNorm(self.h, self.d, cfg.norm_eps)
        self.o_proj = row(inner, cfg.dim, mp, cfg.init_std, cfg.n_layers)

    def _inputs(self, x, wq, wk, wv, wg=None):
        """forward's q, k, v `[B, T, H, K]` and gate (None, `[B, T, H]` or `[B, T, H, K]`) from the projections'
        input x and this rank's weights, as plain functions of them (for the tiled path)."""
        B, T, _ = x.shape
        q, k, v = (F.linear(x, w).view(B, T, self.h, self.d) for w in (wq, wk, wv))
        g = None
        if self.variant in ("linear", "lightning"):
            q, k = F.silu(q), F.silu(k)  # positive features keep the un-normalised sums well behaved
        elif self.variant == "simple_gla":
            g = F.logsigmoid(F.linear(x, wg).float()) / self.normalizer
        elif self.variant == "gla":
            g = F.logsigmoid(F.linear(x, wg).float().view(B, T, self.h, self.d)) / self.normalizer
        # g stays float32 under bf16 autocast: log decays summed over thousands of tokens need the precision
        return q, k, v, g

    def _attend(self, q, k, v, g, cu_seqlens=None):
        g_gamma = self.g_gamma if self.variant == "lightning" else None
        return sp_ops.linear_attention(q, k, v, g=g, g_gamma=g_gamma, method=self.sp.linear_method,
                                       group=self.sp.group, layout=self.sp.layout, backend=self.sp.linear_backend,
                                       overlap=self.sp.linear_overlap, options=self.sp.linear_options,
                                       cu_seqlens=cu_seqlens)

    def _weights(self) -> list[torch.Tensor]:
        ws = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        return ws + [self.g_proj.weight] if self.variant in ("simple_gla", "gla") else ws

    def forward(self, x, cu_seqlens=None):
        """cu_seqlens: packed documents, one global offsets tensor per batch row (None: one sequence a row)."""
        if self.variant in DELTA_VARIANTS:
            if cu_seqlens is not None:
                raise ValueError(f"cu_seqlens (packed documents) is not supported by linear_variant={self.variant!r}:"
                                 " the delta-rule kernels do not compute a reset (a log gate of -inf) exactly")
            return self._delta_forward(x)
        B, T, _ = x.shape
        q = self.q_proj(x)[0].view(B, T, self.h, self.d)
        k = self.k_proj(x)[0].view(B, T, self.h, self.d)
        v = self.v_proj(x)[0].view(B, T, self.h, self.d)
        g = None
        if self.variant in ("linear", "lightning"):
            q, k = F.silu(q), F.silu(k)  # positive features keep the un-normalised sums well behaved
        elif self.variant == "simple_gla":
            g = F.logsigmoid(self.g_proj(x)[0].float()) / self.normalizer
        elif self.variant == "gla":
            g = F.logsigmoid(self.g_proj(x)[0].float().view(B, T, self.h, self.d)) / self.normalizer
        # g stays float32 under bf16 autocast: log decays summed over thousands of tokens need the precision
        o = self._attend(q, k, v, g, cu_seqlens)
        o = self.out_norm(o)   # read in the kernel's dtype; normalised in float32
        return self.o_proj(o.reshape(B, T, self.h * self.d))[0]

    def tiled_with_norm(self, x: torch.Tensor, norm: RMSNorm, tile: int, cu_seqlens=None) -> torch.Tensor:
        """self(norm(x)) with everything but the attention itself run ``tile`` tokens at a time: the norm and
        the q/k/v/gate projections before it, the per-head output norm and the output projection after it.
        Kept for the backward: x, q, k, v, the gate and the attention's output; the `[T, D]` norm output and
        the `[T, H·K]` normalised output live for one tile. The TP collectives run once, outside the tiles."""
        if self.variant in DELTA_VARIANTS:
            raise ValueError(f"memory.mixer_tile does not support linear_variant={self.variant!r}: its short "
                             "convolution mixes neighbouring tokens (set memory.mixer_tile=0)")
        group = self.q_proj.tp_group
        x = copy_to_tensor_model_parallel_region(x, group=group)
        nw = copy_to_tensor_model_parallel_region(norm.weight, group=group)

        def pre(xt, nw_, *ws):
            out = self._inputs(rms_norm(xt, nw_, norm.eps), *ws)
            return out if out[3] is not None else out[:3]
        q, k, v, *g = tiled(pre, x, (nw, *self._weights()), tile)
        o = self._attend(q, k, v, g[0] if g else None, cu_seqlens)

        def post(ot, onw, wo):
            n = rms_norm(ot, onw, self.out_norm.eps)
            return F.linear(n.flatten(2), wo)
        y = tiled(post, o, (self.out_norm.weight, self.o_proj.weight), tile)
        return reduce_from_tensor_model_parallel_region(y, group=group)

    def _head_inputs(self, x, wq, wk, wv, wg=None):
        """q, k, v `[B, T, h, K]` and the gate of the h heads whose rows of the projection weights are given."""
        B, T, _ = x.shape
        q, k, v = (F.linear(x, w).view(B, T, -1, self.d) for w in (wq, wk, wv))
        g = None
        if self.variant in ("linear", "lightning"):
            q, k = F.silu(q), F.silu(k)
        elif self.variant == "simple_gla":
            g = F.logsigmoid(F.linear(x, wg).float()) / self.normalizer
        elif self.variant == "gla":
            g = F.logsigmoid(F.linear(x, wg).float().view(B, T, -1, self.d)) / self.normalizer
        return q, k, v, g

    def head_grouped(self, x: torch.Tensor, norm: RMSNorm, groups: int, tile: int = 0) -> torch.Tensor:
        """self(norm(x)) with this rank's heads run ``groups`` at a time: for each group the norm, its heads'
        q/k/v/gate projection rows, the attention, the per-head output norm and its columns of the output
        projection, summed into the output. Kept for the backward: x only; one group's q, k, v, gate, output
        and their gradients are alive at once, recomputed group by group in the backward. ``tile`` (tokens,
        0: the whole sequence): the token-wise parts run that many tokens at a time, as with mixer_tile. The
        TP collectives run once, outside the groups; the SP operator runs once per group on its heads. The
        output is float32 (the groups' sum; float64 for float64 inputs)."""
        if self.variant in DELTA_VARIANTS:
            raise ValueError(f"memory.mixer_head_groups does not support linear_variant={self.variant!r}: its "
                             "short convolution is not cut by heads here (set memory.mixer_head_groups=0)")
        if groups < 1 or self.h % groups:
            raise ValueError(f"memory.mixer_head_groups = {groups} must divide the heads per TP rank ({self.h})")
        n, d, group = self.h // groups, self.d, self.q_proj.tp_group
        x = copy_to_tensor_model_parallel_region(x, group=group)
        nw = copy_to_tensor_model_parallel_region(norm.weight, group=group)
        ws = self._weights()
        n_in = len(ws)

        def rows(w, j):  # group j's rows of a per-head weight (q/k/v/gate projections, the output norm)
            per = w.shape[0] // self.h
            return w[j * n * per:(j + 1) * n * per]

        def pre(j, xt, nw_, *ps):
            out = self._head_inputs(rms_norm(xt, nw_, norm.eps), *(rows(w, j) for w in ps[:n_in]))
            return out if out[3] is not None else out[:3]

        def mid(j, q, k, v, g=None):
            g_gamma = self.g_gamma[j * n:(j + 1) * n] if self.variant == "lightning" else None
            return sp_ops.linear_attention(q, k, v, g=g, g_gamma=g_gamma, method=self.sp.linear_method,
                                           group=self.sp.group, layout=self.sp.layout,
                                           backend=self.sp.linear_backend, overlap=self.sp.linear_overlap,
                                           options=self.sp.linear_options)

        def post(j, ot, nw_, *ps):
            onw, wo = ps[n_in:]
            o = rms_norm(ot, rows(onw, j), self.out_norm.eps)
            return F.linear(o.flatten(2), wo[:, j * n * d:(j + 1) * n * d])
        y = head_groups(pre, mid, post, x, (nw, *ws, self.out_norm.weight, self.o_proj.weight), groups,
                        tile or x.shape[1])
        return reduce_from_tensor_model_parallel_region(y, group=group)

    def _delta_options(self, device):
        """The Triton kernels' options on sp.delta_path where the backend resolves to Triton; None elsewhere
        (the other backends take no options)."""
        if local_delta.get_backend(self.sp.linear_backend, device).__name__ != local_delta.TRITON_BACKEND:
            return None
        from longscan.kernels.delta_rule.triton import DeltaTritonOptions
        return DeltaTritonOptions(path=self.sp.delta_path)

    def _delta_forward(self, x):
        B, T, _ = x.shape
        group, layout = self.sp.group, self.sp.layout
        q, k, v = (conv(proj(x)[0], group, layout).view(B, T, self.h, self.d)
                   for proj, conv in ((self.q_proj, self.q_conv), (self.k_proj, self.k_conv),
                                      (self.v_proj, self.v_conv)))
        # unit keys: every I - β k kᵀ is a contraction; back in v's dtype, as CUDA autocast normalizes in float32
        # and the kernels' default path is read from k's dtype (bf16: the tensor-core kernels)
        q, k = F.normalize(q, dim=-1).to(v.dtype), F.normalize(k, dim=-1).to(v.dtype)
        beta = torch.sigmoid(self.b_proj(x)[0].float())          # float32 like the gates, under bf16 too
        g = None
        if self.variant == "gated_deltanet":
            g = F.logsigmoid(self.g_proj(x)[0].float()) / self.normalizer
        elif self.variant == "kda":
            g = F.logsigmoid(self.g_proj(x)[0].float().view(B, T, self.h, self.d)) / self.normalizer
        options = self._delta_options(q.device)
        if group is None or group_rank_size(group)[1] == 1:
            o = local_delta.chunk_delta_rule(q, k, v, beta, g, backend=self.sp.linear_backend, options=options)[0]
        else:
            from longscan.parallel.delta_rule import delta_rule_attention
            o = delta_rule_attention(q, k, v, beta, g, method=self.sp.linear_method, group=group, layout=layout,
                                     backend=self.sp.linear_backend, options=options,
                                     transition=self.sp.delta_transition)[0]
        o = self.out_norm(o)   # read in the kernel's dtype; normalised in float32
        return self.o_proj(o.reshape(B, T, self.h * self.d))[0]
