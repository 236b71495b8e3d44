"""Model hyper-parameters of the hybrid linear/softmax LM (a dataclass so YAML maps onto it), and how its
attention is split along the sequence (:class:`SPSpec`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

from longscan.kernels.delta_rule import TRITON_PATHS
from longscan.kernels.linear_attention.options import LinearKernelOptions
from longscan.parallel.delta_rule.common import TRANSITIONS

# the last three are the delta rule (longscan.kernels.delta_rule): DeltaNet, Gated DeltaNet, KDA
DELTA_VARIANTS = ("deltanet", "gated_deltanet", "kda")
LINEAR_VARIANTS = ("linear", "lightning", "simple_gla", "gla") + DELTA_VARIANTS
LAYER_KINDS = {"L": "linear attention", "N": "softmax attention"}
RESIDUAL_DTYPES = ("float32", "bfloat16")


@dataclass
class ModelConfig:
    """Decoder-only LM in the style of LASP-2's Linear-Llama3: RMSNorm, SwiGLU, untied embeddings.

    Layer i is linear attention when ``pattern[i % len(pattern)] == "L"`` and softmax attention (RoPE, GQA)
    when it is ``"N"``.
    """
    vocab_size: int = 257
    """Real vocabulary (byte-level default: 256 bytes + EOS). The embedding is padded (see pad_vocab_to)."""
    pad_vocab_to: int = 64
    """Embedding/output rows are padded to a multiple of this, so the padding does not depend on TP."""
    dim: int = 128
    """Model width."""
    n_layers: int = 4
    """Number of decoder blocks."""
    pattern: str = "LLLN"
    """Layer-type pattern, repeated: L = linear attention, N = softmax attention."""
    n_heads: int = 4
    """Attention heads (query heads of softmax layers)."""
    n_kv_heads: int = 2
    """Key/value heads of softmax layers (GQA when < n_heads)."""
    head_dim: int = 0
    """Per-head width; 0 means dim // n_heads."""
    ffn_dim: int = 0
    """SwiGLU hidden width; 0 means 8/3·dim rounded up to a multiple of 64."""
    linear_variant: str = "lightning"
    """linear | lightning | simple_gla | gla | deltanet | gated_deltanet | kda (the L layers' recurrence)."""
    gate_logit_normalizer: float = 16.0
    """Temperature of the data-dependent gates: g = logsigmoid(x W_g) / normalizer (as in GLA)."""
    rope_theta: float = 10000.0
    """RoPE base of the softmax layers."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of every projection and the embedding."""
    residual_dtype: str = "float32"
    """float32 | bfloat16: the hidden state between blocks (the embedding's output, every block stage's input
    and the residual adds). bfloat16 is Megatron's default in bf16 training (fp32_residual_connection off): a
    model choice, not an exact rewrite of the float32 model; the norms still compute in float32. Needs bf16
    autocast (schedule.precision bf16, or auto on a GPU)."""

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn(self) -> int:
        return self.ffn_dim or 64 * -(-(8 * self.dim // 3) // 64)

    @property
    def padded_vocab(self) -> int:
        return self.pad_vocab_to * -(-self.vocab_size // self.pad_vocab_to)

    @property
    def residual_bytes(self) -> int:
        """Bytes of one element of the residual stream."""
        return 2 if self.residual_dtype == "bfloat16" else 4

    def layer_kind(self, i: int) -> str:
        return self.pattern[i % len(self.pattern)]

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks that need no other section; ValueError naming the key (``model.<key>``)."""
        for name in ("vocab_size", "pad_vocab_to", "dim", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("head_dim", "ffn_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0 (0: derived from model.dim), got {getattr(self, name)}")
        for name in ("gate_logit_normalizer", "rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"model.{name} must be a finite number > 0, got {value}")
        if self.linear_variant not in LINEAR_VARIANTS:
            raise ValueError(f"model.linear_variant = {self.linear_variant!r} is not allowed; choose one of "
                             f"{', '.join(LINEAR_VARIANTS)}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"model.residual_dtype = {self.residual_dtype!r} is not allowed; choose one of "
                             f"{', '.join(RESIDUAL_DTYPES)}")
        if not self.pattern or set(self.pattern) - set(LAYER_KINDS):
            raise ValueError(f"model.pattern = {self.pattern!r} must be a non-empty string of L (linear) and N "
                             "(softmax)")
        if self.dim % self.n_heads and not self.head_dim:
            raise ValueError(f"model.dim = {self.dim} is not divisible by model.n_heads = {self.n_heads}; "
                             "set model.head_dim")
        if "N" in self.pattern and self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads = {self.n_heads} is not divisible by model.n_kv_heads = "
                             f"{self.n_kv_heads}")
        if self.hd % 2:
            raise ValueError(f"head dim {self.hd} must be even (RoPE)")


class ParallelSection(Protocol):
    """The fields of the training config's parallel section that the model reads."""
    layout: str
    linear_method: str
    softmax_method: str
    linear_backend: str
    softmax_backend: str
    linear_overlap: bool
    delta_transition: str


@dataclass(frozen=True)
class SPSpec:
    """How attention is split along the sequence: the SP group (megatron's context-parallel group), and the
    options every linear-attention layer hands its kernels.

    ``linear_options``: the Triton linear-attention kernels' LinearKernelOptions (None: their defaults),
    passed by every linear-attention layer to ``longscan.parallel.linear_attention`` or the local kernel. The
    delta-rule variants (deltanet, gated_deltanet, kda) run other kernels and ignore it; where their Triton
    backend runs, ``delta_path`` picks its kernel set (``DeltaTritonOptions.path``; "auto": "wy" for bf16
    activations, "float32" otherwise) and ``delta_transition`` how ZeCO applies a rank's segment
    (``delta_rule_attention``'s ``transition``).
    """
    group: Any = None
    layout: str = "zigzag"
    linear_method: str = "zeco"
    softmax_method: str = "ring"
    linear_backend: str = "auto"
    softmax_backend: str = "auto"
    linear_overlap: bool = False
    linear_options: LinearKernelOptions | None = None
    delta_path: str = "auto"
    delta_transition: str = "matrix"

    def __post_init__(self):
        if self.linear_options is not None and not isinstance(self.linear_options, LinearKernelOptions):
            raise TypeError(f"SPSpec.linear_options must be a LinearKernelOptions or None, got "
                            f"{type(self.linear_options).__name__}")
        if self.delta_path not in TRITON_PATHS:
            raise ValueError(f"SPSpec.delta_path must be one of {TRITON_PATHS}, got {self.delta_path!r}")
        if self.delta_transition not in TRANSITIONS:
            raise ValueError(f"SPSpec.delta_transition must be one of {TRANSITIONS}, got {self.delta_transition!r}")

    @classmethod
    def from_config(cls, parallel: ParallelSection, group,
                    linear_options: LinearKernelOptions | None = None, delta_path: str = "auto") -> "SPSpec":
        """The spec of the parallel config section (``longscan.training.config.ParallelConfig``) over ``group``,
        its linear layers' kernels run with ``linear_options`` (the kernels section's ``options()``) and the
        delta rule's Triton kernels on ``delta_path`` (``kernels.delta_path``)."""
        return cls(group=group, layout=parallel.layout, linear_method=parallel.linear_method,
                   softmax_method=parallel.softmax_method, linear_backend=parallel.linear_backend,
                   softmax_backend=parallel.softmax_backend, linear_overlap=parallel.linear_overlap,
                   linear_options=linear_options, delta_path=delta_path,
                   delta_transition=parallel.delta_transition)


STAGE_MODES = ("none", "checkpoint", "offload")
PINNED_MODES = ("torch", "exact")
"""memory.pinned: where offloaded inputs wait on the host (torch's caching pinned allocator, or exactly-sized
page-locked buffers of longscan.training.pinned_pool)."""


@dataclass(frozen=True)
class MemoryOptions:
    """What a block keeps for its backward, and how the MLP and the loss are cut along the sequence.

    Each of a block's two stages (the mixer: norm + attention + residual; the MLP: norm + SwiGLU + residual)
    is run in one of STAGE_MODES: ``none`` keeps its activations, ``checkpoint`` keeps its input and
    recomputes it in the backward, ``offload`` does the same with the input waiting in host memory.
    ``blocks`` applies a mode to whole blocks instead (one kept input a block, both stages recomputed); it
    excludes the per-stage modes.
    """
    linear_layers: str = "none"
    """Mode of the mixer stage of linear-attention blocks."""
    softmax_layers: str = "none"
    """Mode of the mixer stage of softmax-attention blocks."""
    mlp: str = "none"
    """Mode of the MLP stage of every block."""
    mlp_tile: int = 0
    """Tokens per tile of the sequence-tiled MLP (its norm included); 0: the MLP runs on the whole sequence."""
    loss_chunk: int = 0
    """Tokens per chunk of the cross entropy computed from the hidden states; 0: the whole `[T, vocab]` logits."""
    mixer_tile: int = 0
    """Tokens per tile of the mixers' token-wise parts (norm, projections, gates, output norm); 0: untiled."""
    mixer_head_groups: int = 0
    """Mixers run their heads (this TP rank's; softmax mixers: KV heads with their query heads) in this many
    groups, one group's q, k, v, output and gradients alive at a time, recomputed per group in the backward;
    0 or 1: all heads at once."""
    blocks: str = "none"
    """Mode of whole blocks: none (the per-stage modes above decide) | checkpoint (each block's input kept on
    the device, the block recomputed in the backward) | offload (the same, the input waiting in host memory)."""
    recompute_blocks: int = -1
    """How many blocks of each pipeline stage follow the modes above (the first ones of the stage, whose saved
    tensors live the longest); the others keep their activations (mode none) and skip the recomputation.
    -1: every block follows them. Tiles and head groups apply to every block either way."""
    pinned: str = "torch"
    """Host buffers of offloaded inputs (CUDA): torch (torch's pinned allocator, each block rounded up to a power of
    two) | exact (exactly-sized page-locked buffers kept in a pool and reused from step to step)."""

    def __post_init__(self):
        if self.recompute_blocks < -1:
            raise ValueError(f"memory.recompute_blocks must be -1 (every block) or a count of blocks >= 0, got "
                             f"{self.recompute_blocks}")
        for name in ("blocks", "linear_layers", "softmax_layers", "mlp"):
            if getattr(self, name) not in STAGE_MODES:
                raise ValueError(f"memory.{name} = {getattr(self, name)!r} is not allowed; choose one of "
                                 f"{', '.join(STAGE_MODES)}")
        stages = (self.linear_layers, self.softmax_layers, self.mlp)
        if self.blocks != "none" and stages != ("none",) * 3:
            raise ValueError(f"memory.blocks = {self.blocks!r} recomputes whole blocks; memory.linear_layers / "
                             "softmax_layers / mlp must then be 'none', got "
                             f"{' / '.join(repr(mode) for mode in stages)}")
        if self.pinned not in PINNED_MODES:
            raise ValueError(f"memory.pinned = {self.pinned!r} is not allowed; choose one of {', '.join(PINNED_MODES)}")
        for name in ("mlp_tile", "loss_chunk", "mixer_tile"):
            if getattr(self, name) < 0:
                raise ValueError(f"memory.{name} must be >= 0 tokens (0 = off), got {getattr(self, name)}")
        if self.mixer_head_groups < 0:
            raise ValueError(f"memory.mixer_head_groups must be >= 0 (0 or 1 = off), got {self.mixer_head_groups}")

    @property
    def head_groups(self) -> int:
        """Head groups of the mixers (1: all heads at once)."""
        return max(self.mixer_head_groups, 1)

    @property
    def offloads(self) -> bool:
        return "offload" in (self.blocks, self.linear_layers, self.softmax_layers, self.mlp)

    def follows_modes(self, index: int) -> bool:
        """Does block ``index`` (counted from 0 within its pipeline stage) follow the modes?"""
        return self.recompute_blocks < 0 or index < self.recompute_blocks

    def for_block(self, index: int) -> "MemoryOptions":
        """The options block ``index`` of a pipeline stage runs with: these, or these with every mode none."""
        if self.follows_modes(index):
            return self
        return replace(self, linear_layers="none", softmax_layers="none", mlp="none", blocks="none",
                       recompute_blocks=-1)
