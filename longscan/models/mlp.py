"""SwiGLU MLP, hidden units split across TP; optionally tiled along the sequence with its norm. silu(w1 x) ⊙ w3 x
is one fused op (``longscan.kernels.swiglu``) that keeps w1 x and w3 x for its backward, not silu(w1 x)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from torch import nn

from longscan.kernels.swiglu import swiglu
from longscan.models.norms import RMSNorm, rms_norm
from longscan.models.tiling import tiled
from longscan.models.tp import column, row


def norm_swiglu(x: torch.Tensor, norm_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                eps: float) -> torch.Tensor:
    """This TP rank's part of w2(silu(w1 n) ⊙ w3 n), n = RMSNorm(x): no communication, token by token."""
    n = rms_norm(x, norm_weight, eps)
    return F.linear(swiglu(F.linear(n, w1), F.linear(n, w3)), w2)


class SwiGLU(nn.Module):
    """x `[B, T, D]` -> w2(silu(w1 x) ⊙ w3 x) `[B, T, D]`; w1, w3 column-parallel, w2 row-parallel."""

    def __init__(self, cfg, mp):
        super().__init__()
        self.w1 = column(cfg.dim, cfg.ffn, mp, cfg.init_std)
        self.w3 = column(cfg.dim, cfg.ffn, mp, cfg.init_std)
        self.w2 = row(cfg.ffn, cfg.dim, mp, cfg.init_std, cfg.n_layers)

    def forward(self, x):
        return self.w2(swiglu(self.w1(x)[0], self.w3(x)[0]))[0]

    def tiled_with_norm(self, x: torch.Tensor, norm: RMSNorm, tile: int) -> torch.Tensor:
        """self(norm(x)) computed ``tile`` tokens at a time, the `[T, ffn/TP]` intermediates (and the norm's
        output) recomputed per tile in the backward. The TP collectives stay outside the tiles: x and the norm
        weight enter the TP region once (their gradients are summed over TP, as the column layers' are) and
        the partial outputs are summed once."""
        group = self.w1.tp_group
        x = copy_to_tensor_model_parallel_region(x, group=group)
        nw = copy_to_tensor_model_parallel_region(norm.weight, group=group)

        def fn(xt, nw_, w1, w3, w2):
            return norm_swiglu(xt, nw_, w1, w3, w2, norm.eps)
        y = tiled(fn, x, (nw, self.w1.weight, self.w3.weight, self.w2.weight), tile)
        return reduce_from_tensor_model_parallel_region(y, group=group)
