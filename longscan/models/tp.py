"""Megatron-core tensor-parallel building blocks with the init this model uses.

Weights are created on CPU from the full master weight (``use_cpu_initialization``) and split, so a
given seed gives the same effective weights for every TP size.
"""
from __future__ import annotations

import math

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def normal_init(std: float):
    def init(w: torch.Tensor):
        return torch.nn.init.normal_(w, mean=0.0, std=std)
    return init


def column(in_dim: int, out_dim: int, mp: ModelParallelConfig, std: float) -> ColumnParallelLinear:
    """x `[..., in]` -> `[..., out/TP]` (this rank's output columns, not gathered)."""
    return ColumnParallelLinear(in_dim, out_dim, config=mp, init_method=normal_init(std), bias=False,
                                gather_output=False, skip_bias_add=True)


def row(in_dim: int, out_dim: int, mp: ModelParallelConfig, std: float, n_layers: int) -> RowParallelLinear:
    """x `[..., in/TP]` -> `[..., out]` all-reduced over TP; init scaled by 1/sqrt(2·layers) (GPT-2)."""
    return RowParallelLinear(in_dim, out_dim, config=mp, init_method=normal_init(std / math.sqrt(2 * n_layers)),
                             bias=False, input_is_parallel=True, skip_bias_add=True)
