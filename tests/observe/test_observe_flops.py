"""Model FLOPs on a hand-counted model, and MFU."""
from __future__ import annotations

import pytest

from longscan.models.args import ModelConfig
from longscan.observe import flops

# dim 8, heads 2 (head dim 4), 1 kv head, ffn 16, vocab 64: one linear layer, one softmax layer
CFG = ModelConfig(vocab_size=64, pad_vocab_to=64, dim=8, n_layers=2, pattern="LN", n_heads=2, n_kv_heads=1,
                  ffn_dim=16, linear_variant="lightning")


def test_matmul_params_and_flops():
    # L: q,k,v,o 4·8·8 = 256; N: q,o 2·8·8 + k,v 2·8·4 = 192; SwiGLU 3·8·16 = 384 each
    assert flops.matmul_params(CFG) == 256 + 384 + 192 + 384
    assert flops.matmul_flops_per_token(CFG) == 6 * 1216 + 6 * 8 * 64
    gla = ModelConfig(**{**CFG.__dict__, "linear_variant": "gla"})
    assert flops.matmul_params(gla) == 1216 + 8 * 8                 # the per-key gate projection
    # the delta rule adds β's projection (8·2); Gated DeltaNet a scalar gate's (8·2), KDA a per-key one's (8·8)
    delta = {v: ModelConfig(**{**CFG.__dict__, "linear_variant": v}) for v in ("deltanet", "gated_deltanet", "kda")}
    assert [flops.matmul_params(c) for c in delta.values()] == [1216 + 16, 1216 + 32, 1216 + 80]


def test_linear_attention_flops():
    # per token and head: 2·C·(K+V) + 4·K·V = 2·64·8 + 4·16 = 1088; ×3 for training; 10 tokens, 2 heads
    assert flops.linear_attention_flops(10, 2, 4, 4) == 3 * 10 * 2 * 1088
    assert flops.linear_attention_flops(10, 2, 4, 4, chunk=32) == 3 * 10 * 2 * (2 * 32 * 8 + 64)


def test_delta_rule_flops():
    # per token and head, C = 64, K = V = 4: 2·64·(12 + 8) + 2·64²/3 (2730) + 6·16 = 2560 + 2730 + 96 = 5386; ×3
    assert flops.delta_rule_flops(10, 2, 4, 4) == 3 * 10 * 2 * 5386
    kda = ModelConfig(**{**CFG.__dict__, "linear_variant": "kda"})
    matmuls = 10 * (6 * (1216 + 80) + 6 * 8 * 64)
    assert flops.step_flops(kda, 2, 5) == matmuls + 3 * 10 * 2 * 5386 + 3 * 2 * 2 * 15 * 16


def test_softmax_attention_flops():
    # T = 4: 10 causal pairs, each 4·D = 16 FLOPs forward; ×3; 2 heads
    assert flops.softmax_attention_flops(1, 4, 2, 4) == 3 * 2 * 10 * 16


def test_step_flops():
    # batch 2 × 5 tokens: matmuls over 10 tokens, linear attention over 10 tokens, softmax 15 pairs per sequence
    assert flops.step_flops(CFG, 2, 5) == 10 * 10368 + 3 * 10 * 2 * 1088 + 3 * 2 * 2 * 15 * 16


def test_peak_and_mfu():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("cpu") is None and flops.peak_flops(None) is None
    assert flops.mfu(1e12, 2.0, 4, 989e12) == pytest.approx(1e12 / (8 * 989e12))
    assert flops.mfu(1e12, 2.0, 4, None) is None


def test_progress_line_shows_mfu(capsys):
    from longscan.training.metrics import Progress
    p = Progress(total=10, every=1, enabled=True)
    p.update(1, 2.5, 1000.0, 10.0, 1e-3, mfu=0.4213)
    p.update(2, 2.4, 1000.0, 10.0, 1e-3)
    first, second = capsys.readouterr().out.splitlines()
    assert "| MFU 42.1% |" in first and "MFU" not in second
