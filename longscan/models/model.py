"""The hybrid LM, built as one pipeline stage: embedding on the first stage, head + loss on the last.

Activations travel between stages as `[T, B, D]` (megatron-core's P2P shape); inside a stage `[B, T, D]`.
Every block is seeded by its global index, so a stage of a PP split holds exactly the weights the same
layers have in the unsplit model.
"""
from __future__ import annotations

from typing import Callable

import torch
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn
from torch.utils.checkpoint import checkpoint

from longscan.distributed.layouts import positions
from longscan.models.args import MemoryOptions, ModelConfig, SPSpec
from longscan.models.linear_attn import LinearAttention
from longscan.models.loss import chunked_cross_entropy
from longscan.models.mlp import SwiGLU
from longscan.models.norms import RMSNorm
from longscan.models.rope import rope_cos_sin
from longscan.models.softmax_attn import SoftmaxAttention
from longscan.models.tp import column, normal_init
from longscan.training.offload import HostStash, offloaded_checkpoint
from longscan.training.pinned_pool import PinnedPool


def _run_stage(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str, training: bool,
               modules: tuple[nn.Module, ...], stash: HostStash | None) -> torch.Tensor:
    """fn(x) kept, checkpointed, or checkpointed with its input offloaded (training only); ``modules`` hold
    the parameters fn uses."""
    if mode == "none" or not (training and torch.is_grad_enabled()):
        return fn(x)
    if mode == "checkpoint":
        return checkpoint(fn, x, use_reentrant=False)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return offloaded_checkpoint(fn, x, params, stash)


def _residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y in the residual stream's dtype (x's): a float32 stream adds as type promotion would; a bfloat16
    one stays bfloat16 (a branch summed in float32, as head groups' are, is rounded once before the add)."""
    return x + y.to(x.dtype)


def _block_mode(memory: MemoryOptions, activation_checkpointing: bool) -> str:
    """How whole blocks run: schedule.activation_checkpointing is memory.blocks = checkpoint."""
    if activation_checkpointing and memory.blocks == "offload":
        raise ValueError("activation_checkpointing keeps each block's input on the device; memory.blocks = "
                         "'offload' keeps it in host memory: use one of them")
    return "checkpoint" if activation_checkpointing else memory.blocks


RESIDUAL_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""model.residual_dtype -> the dtype of the hidden state between blocks."""


class Block(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then + SwiGLU(norm(x))."""

    def __init__(self, cfg: ModelConfig, mp, index: int, tp_rank: int, tp_size: int, sp: SPSpec,
                 memory: MemoryOptions = MemoryOptions()):
        super().__init__()
        self.kind = cfg.layer_kind(index)
        self.memory = memory
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if self.kind == "L":
            self.attn = LinearAttention(cfg, mp, tp_rank, tp_size, sp)
        else:
            self.attn = SoftmaxAttention(cfg, mp, tp_size, sp)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, mp)

    def _mixer(self, x, cos, sin, cu_seqlens):
        return _residual_add(x, self._mixer_branch(x, cos, sin, cu_seqlens))

    def _mixer_branch(self, x, cos, sin, cu_seqlens):
        tile = self.memory.mixer_tile
        groups = self.memory.head_groups
        if groups > 1 and self.kind == "L":
            if cu_seqlens is not None:  # the grouped path passes no document boundaries to the attention
                raise ValueError("memory.mixer_head_groups does not take packed documents (cu_seqlens) yet")
            return self.attn.head_grouped(x, self.attn_norm, groups, tile)
        if groups > 1:
            return self.attn.head_grouped(x, self.attn_norm, cos, sin, groups, tile, cu_seqlens)
        if tile and self.kind == "L":
            return self.attn.tiled_with_norm(x, self.attn_norm, tile, cu_seqlens)
        if tile:
            return self.attn.tiled_with_norm(x, self.attn_norm, cos, sin, tile, cu_seqlens)
        h = self.attn_norm(x)
        return self.attn(h, cu_seqlens) if self.kind == "L" else self.attn(h, cos, sin, cu_seqlens)

    def _ffn(self, x):
        if self.memory.mlp_tile:
            return _residual_add(x, self.mlp.tiled_with_norm(x, self.mlp_norm, self.memory.mlp_tile))
        return _residual_add(x, self.mlp(self.mlp_norm(x)))

    def forward(self, x, cos, sin, cu_seqlens=None, stash: HostStash | None = None):
        m = self.memory
        mixer_mode = m.linear_layers if self.kind == "L" else m.softmax_layers
        x = _run_stage(lambda t: self._mixer(t, cos, sin, cu_seqlens), x, mixer_mode, self.training,
                       (self.attn_norm, self.attn), stash)
        return _run_stage(self._ffn, x, m.mlp, self.training, (self.mlp_norm, self.mlp), stash)


class HybridLM(nn.Module):
    """One pipeline stage of the LM.

    forward(tokens `[B, T]`, labels `[B, T]`) with T the local (SP) length returns the per-token loss
    `[B, T]` float32 on the last stage, else the hidden state `[T, B, D]` for the next stage.
    """
    model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules

    def __init__(self, cfg: ModelConfig, mp, sp: SPSpec, *, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                 seed=0, activation_checkpointing=False, memory: MemoryOptions = MemoryOptions()):
        super().__init__()
        if activation_checkpointing and (memory.linear_layers, memory.softmax_layers, memory.mlp) != ("none",) * 3:
            raise ValueError("activation_checkpointing checkpoints whole blocks; it cannot be combined with "
                             "per-stage memory modes (set those to 'none' or turn it off)")
        self.memory, self.tp_rank = memory, tp_rank
        self.cfg, self.config, self.sp = cfg, mp, sp  # megatron's schedules read `.config`
        self.first, self.last = pp_rank == 0, pp_rank == pp_size - 1
        self.activation_checkpointing = activation_checkpointing
        self.block_mode = _block_mode(memory, activation_checkpointing)
        self.residual_dtype = RESIDUAL_TORCH_DTYPES[cfg.residual_dtype]
        per = cfg.n_layers // pp_size
        rng = torch.random.get_rng_state()
        if self.first:
            torch.manual_seed(seed)
            self.embed = VocabParallelEmbedding(cfg.padded_vocab, cfg.dim, init_method=normal_init(cfg.init_std),
                                                config=mp)
        self.layers = nn.ModuleDict()
        for i in range(pp_rank * per, (pp_rank + 1) * per):
            torch.manual_seed(seed + 1 + i)
            self.layers[str(i)] = Block(cfg, mp, i, tp_rank, tp_size, sp, memory.for_block(i - pp_rank * per))
        # memory.recompute_blocks: the stage's first blocks follow the modes, the others keep their activations
        self.block_modes = [self.block_mode if memory.follows_modes(j) else "none" for j in range(per)]
        if self.last:
            torch.manual_seed(seed + 1 + cfg.n_layers)
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = column(cfg.dim, cfg.padded_vocab, mp, cfg.init_std)
        torch.random.set_rng_state(rng)  # building the model does not move the training RNG
        self.input_tensor = None
        self.host_pool: PinnedPool | None = None
        """memory.pinned = exact: the offloaded inputs' host buffers, made at the first offloading forward (on the
        device it runs on) and reused by every later one."""

    def set_input_tensor(self, t):
        """Called by megatron's schedules with the activation received from the previous stage."""
        self.input_tensor = t[0] if isinstance(t, (list, tuple)) else t

    def _stash(self, device: torch.device) -> HostStash:
        """A forward's stash: torch's pinned allocator, or (memory.pinned = exact) the model's pool."""
        if self.memory.pinned == "torch":
            return HostStash(device)
        if self.host_pool is None:
            self.host_pool = PinnedPool.for_device(device)
        return HostStash(device, self.host_pool.allocate, self.host_pool.release)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, cu_seqlens=None, doc_positions=None,
                loss_mask=None) -> torch.Tensor:
        """Packed documents (``longscan.training.packing``): ``cu_seqlens`` one global offsets tensor per row,
        ``doc_positions`` `[B, T]` in-document RoPE positions, ``loss_mask`` `[B, T]` multiplies the loss."""
        x = self.embed(tokens) if self.first else self.input_tensor.transpose(0, 1)
        if self.residual_dtype != torch.float32:  # a float32 stream takes x as it comes (as it always has)
            if not torch.is_autocast_enabled(x.device.type):
                raise ValueError("model.residual_dtype = 'bfloat16' needs bf16 autocast (schedule.precision = bf16, "
                                 "or auto on a GPU): without it the blocks' float32 weights meet bfloat16 inputs")
            x = x.to(self.residual_dtype)
        T = x.shape[1]
        pos = positions(T, self.sp.group, self.sp.layout, device=x.device) if doc_positions is None else doc_positions
        cos, sin = rope_cos_sin(pos, self.cfg.hd, self.cfg.rope_theta)
        offloads = self.memory.offloads and self.memory.recompute_blocks != 0
        stash = self._stash(x.device) if offloads and self.training else None  # this pass's inputs
        for layer, block_mode in zip(self.layers.values(), self.block_modes):
            if block_mode == "none":
                x = layer(x, cos, sin, cu_seqlens, stash)
            else:  # the whole block is one stage: its input kept (checkpoint) or in host memory (offload)
                x = _run_stage(lambda t, b=layer: b(t, cos, sin, cu_seqlens), x, block_mode, self.training,
                               (layer,), stash)
        if not self.last:  # the receiving stage allocates its buffer in pipeline_dtype
            return x.transpose(0, 1).contiguous().to(self.config.pipeline_dtype or x.dtype)
        if self.memory.loss_chunk:
            loss = chunked_cross_entropy(self.norm(x), self.output.weight, labels, self.memory.loss_chunk,
                                         self.output.tp_group, self.tp_rank)
        else:
            loss = vocab_parallel_cross_entropy(self.output(self.norm(x))[0].float(), labels)
        return loss if loss_mask is None else loss * loss_mask
