"""The hybrid LM, built as one pipeline stage: embedding on the first stage, head + loss on the last.

Activations travel between stages as `[T, B, D]` (megatron-core's P2P shape); inside a stage `[B, T, D]`.
Every block is seeded by its global index, so a stage of a PP split holds exactly the weights the same
layers have in the unsplit model.
"""
from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn
from torch.utils.checkpoint import checkpoint

from longscan.distributed.layouts import positions
from longscan.models.args import ModelConfig, SPSpec
from longscan.models.linear_attn import LinearAttention
from longscan.models.mlp import SwiGLU
from longscan.models.norms import RMSNorm
from longscan.models.rope import rope_cos_sin
from longscan.models.softmax_attn import SoftmaxAttention
from longscan.models.tp import column, normal_init


class Block(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then + SwiGLU(norm(x))."""

    def __init__(self, cfg: ModelConfig, mp, index: int, tp_rank: int, tp_size: int, sp: SPSpec):
        super().__init__()
        self.kind = cfg.layer_kind(index)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if self.kind == "L":
            self.attn = LinearAttention(cfg, mp, tp_rank, tp_size, sp)
        else:
            self.attn = SoftmaxAttention(cfg, mp, tp_size, sp)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, mp)

    def forward(self, x, cos, sin):
        h = self.attn_norm(x)
        x = x + (self.attn(h) if self.kind == "L" else self.attn(h, cos, sin))
        return x + self.mlp(self.mlp_norm(x))


class HybridLM(nn.Module):
    """One pipeline stage of the LM.

    forward(tokens `[B, T]`, labels `[B, T]`) with T the local (SP) length returns the per-token loss
    `[B, T]` float32 on the last stage, else the hidden state `[T, B, D]` for the next stage.
    """
    model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules

    def __init__(self, cfg: ModelConfig, mp, sp: SPSpec, *, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                 seed=0, activation_checkpointing=False):
        super().__init__()
        self.cfg, self.config, self.sp = cfg, mp, sp  # megatron's schedules read `.config`
        self.first, self.last = pp_rank == 0, pp_rank == pp_size - 1
        self.activation_checkpointing = activation_checkpointing
        per = cfg.n_layers // pp_size
        rng = torch.random.get_rng_state()
        if self.first:
            torch.manual_seed(seed)
            self.embed = VocabParallelEmbedding(cfg.padded_vocab, cfg.dim, init_method=normal_init(cfg.init_std),
                                                config=mp)
        self.layers = nn.ModuleDict()
        for i in range(pp_rank * per, (pp_rank + 1) * per):
            torch.manual_seed(seed + 1 + i)
            self.layers[str(i)] = Block(cfg, mp, i, tp_rank, tp_size, sp)
        if self.last:
            torch.manual_seed(seed + 1 + cfg.n_layers)
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = column(cfg.dim, cfg.padded_vocab, mp, cfg.init_std)
        torch.random.set_rng_state(rng)  # building the model does not move the training RNG
        self.input_tensor = None

    def set_input_tensor(self, t):
        """Called by megatron's schedules with the activation received from the previous stage."""
        self.input_tensor = t[0] if isinstance(t, (list, tuple)) else t

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) if self.first else self.input_tensor.transpose(0, 1)
        T = x.shape[1]
        pos = positions(T, self.sp.group, self.sp.layout, device=x.device)
        cos, sin = rope_cos_sin(pos, self.cfg.hd, self.cfg.rope_theta)
        for layer in self.layers.values():
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        if not self.last:  # the receiving stage allocates its buffer in pipeline_dtype
            return x.transpose(0, 1).contiguous().to(self.config.pipeline_dtype or x.dtype)
        logits = self.output(self.norm(x))[0]
        return vocab_parallel_cross_entropy(logits.float(), labels)
