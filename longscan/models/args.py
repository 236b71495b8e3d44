"""Model hyper-parameters of the hybrid linear/softmax LM (a dataclass so YAML maps onto it)."""
from __future__ import annotations

from dataclasses import dataclass

# the last three are the delta rule (longscan.kernels.delta_rule): DeltaNet, Gated DeltaNet, KDA
LINEAR_VARIANTS = ("linear", "lightning", "simple_gla", "gla", "deltanet", "gated_deltanet", "kda")
LAYER_KINDS = {"L": "linear attention", "N": "softmax attention"}


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

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn(self) -> int:
        return self.ffn_dim or 64 * -(-(8 * self.dim // 3) // 64)

    @property
    def padded_vocab(self) -> int:
        return self.pad_vocab_to * -(-self.vocab_size // self.pad_vocab_to)

    def layer_kind(self, i: int) -> str:
        return self.pattern[i % len(self.pattern)]
