"""Model FLOPs of one training step (forward + backward = 3 × forward) and model FLOP utilisation.

Model FLOPs count what the model computes, whatever the parallel split or recomputation: activation
checkpointing's second forward is not counted, and a multiply-add is 2 FLOPs.
"""
from __future__ import annotations

from longscan.models.args import DELTA_VARIANTS, ModelConfig

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
CHUNK = 64   # the chunk length of the chunked linear-attention kernels (and of the delta rule's wy path)


def linear_mixer_weights(cfg: ModelConfig) -> int:
    """Matmul weights of one linear-attention mixer: q, k, v, o, the gate's projection and the delta rule's β."""
    d, inner = cfg.dim, cfg.n_heads * cfg.hd
    n = 4 * d * inner                                  # q, k, v, o
    if cfg.linear_variant in ("simple_gla", "gated_deltanet"):
        n += d * cfg.n_heads                           # scalar gate per head
    elif cfg.linear_variant in ("gla", "kda"):
        n += d * inner                                 # per-key gate
    if cfg.linear_variant in DELTA_VARIANTS:
        n += d * cfg.n_heads                           # β per head
    return n


def matmul_params(cfg: ModelConfig) -> int:
    """Weights of every matmul except the embedding and the output projection (norms and the delta rule's
    depthwise short convolutions are not matmuls)."""
    d, hd = cfg.dim, cfg.hd
    inner, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    n = 0
    for i in range(cfg.n_layers):
        if cfg.layer_kind(i) == "L":
            n += linear_mixer_weights(cfg)
        else:
            n += 2 * d * inner + 2 * d * kv            # q, o; k, v (GQA)
        n += 3 * d * cfg.ffn                           # SwiGLU w1, w3, w2
    return n


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    """6·N per token for the non-embedding matmul weights N, plus the output projection (6·D·padded vocab)."""
    return 6 * matmul_params(cfg) + 6 * cfg.dim * cfg.padded_vocab


def linear_attention_flops(tokens: int, heads: int, key_dim: int, value_dim: int, chunk: int = CHUNK) -> int:
    """Training FLOPs of chunked linear attention over ``tokens`` tokens of ``heads`` heads.

    Forward per token and head: intra-chunk scores q·kᵀ over the chunk's C keys (2·C·K; the whole C×C block
    is computed, then masked) and their product with v (2·C·V); state terms q·S (2·K·V) and the state update
    kᵀv (2·K·V). Backward: twice the forward.
    """
    forward = 2 * chunk * (key_dim + value_dim) + 4 * key_dim * value_dim
    return 3 * tokens * heads * forward


def delta_rule_flops(tokens: int, heads: int, key_dim: int, value_dim: int, chunk: int = CHUNK) -> int:
    """Training FLOPs of the chunked delta rule (the WY form) over ``tokens`` tokens of ``heads`` heads.

    Forward per token and head: the chunk's products A = (βK)Kᵀ, W = T(βK), Q Kᵀ (2·C·K each), U = T(βV) and
    (Q Kᵀ)·U (2·C·V each); the inverse T of the unit lower-triangular C×C (I + A), C³/3 multiply-adds a chunk
    (2·C²/3 a token); the state terms W·S, the update Kᵀ·U and q·S (2·K·V each). Backward: twice the forward.
    """
    forward = 2 * chunk * (3 * key_dim + 2 * value_dim) + 2 * chunk * chunk // 3 + 6 * key_dim * value_dim
    return 3 * tokens * heads * forward


def softmax_attention_flops(batch: int, seq_len: int, heads: int, head_dim: int) -> int:
    """Training FLOPs of causal softmax attention: half the square of query·key pairs (T(T+1)/2), each a
    q·k dot product and a p·v product (4·D); backward twice the forward."""
    pairs = seq_len * (seq_len + 1) // 2
    return 3 * batch * heads * pairs * 4 * head_dim


def step_flops(cfg: ModelConfig, global_batch: int, seq_len: int) -> int:
    """Model FLOPs of one optimizer step over ``global_batch`` sequences of ``seq_len`` tokens (all ranks)."""
    tokens = global_batch * seq_len
    total = tokens * matmul_flops_per_token(cfg)
    for i in range(cfg.n_layers):
        if cfg.layer_kind(i) == "L":
            kernel = delta_rule_flops if cfg.linear_variant in DELTA_VARIANTS else linear_attention_flops
            total += kernel(tokens, cfg.n_heads, cfg.hd, cfg.hd)
        else:
            total += softmax_attention_flops(global_batch, seq_len, cfg.n_heads, cfg.hd)
    return total


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU by name (None for a CPU or a GPU not in PEAK_BF16_FLOPS)."""
    if not device_name:
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name.upper():
            return value
    return None


def device_peak_flops(device) -> float | None:
    """The peak of a torch device (None on CPU)."""
    import torch
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def mfu(flops: float, seconds: float, devices: int, peak: float | None) -> float | None:
    """Model FLOP utilisation: flops done in ``seconds`` over ``devices`` devices of ``peak`` FLOP/s each."""
    if peak is None or seconds <= 0:
        return None
    return flops / (seconds * devices * peak)
