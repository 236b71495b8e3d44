"""The memory estimator: hand-counted cases, and its per-token counts against what autograd saves on CPU.

One spawn of two gloo processes builds the model at TP = 2 and TP = 1 (every linear variant) and measures
the bytes of the tensors each block stage saves for its backward (float32, and under CPU bf16 autocast),
and the parameters each rank holds; the estimator must give the same numbers.
"""
from __future__ import annotations

import os

import pytest

from harness import each_tp, run_distributed, tp_model
from longscan.models.args import ModelConfig
from longscan.models.args import MemoryOptions
from longscan.training.config import ConfigError, load_config, validate
from longscan.training.memory import (GiB, Layout, check_capacity, estimate, estimate_config, layer_params,
                                      loss_bytes, saved_per_token, stage_params)
from training_common import PER_STAGE_1M, saved_by_stage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_1B = os.path.join(REPO, "configs", "hybrid_1b_gpu.yaml")
CONFIG_1M = os.path.join(REPO, "configs", "hybrid_1b_1m.yaml")
VARIANTS = ("linear", "lightning", "simple_gla", "gla")
T = 64


def _cfg(variant):  # GQA with 2 KV heads a TP rank at TP 2, so 2 head groups take the softmax layer too
    return ModelConfig(dim=32, n_layers=4, pattern="LLLN", n_heads=8, n_kv_heads=4, linear_variant=variant,
                       vocab_size=100)


def _measure(rank, world):
    from longscan.models.model import SPSpec
    out = {}
    for tp in each_tp():
        for variant in VARIANTS:
            cfg = _cfg(variant)
            model = tp_model(cfg, SPSpec(linear_backend="torch"), tp)
            out[("params", tp, variant)] = sum(p.numel() for p in model.parameters())
            tiled = tp_model(cfg, SPSpec(linear_backend="torch"), tp, memory=MemoryOptions(mixer_tile=16))
            grouped = tp_model(cfg, SPSpec(linear_backend="torch"), tp,
                               memory=MemoryOptions(mixer_tile=16, mixer_head_groups=2))
            for bf16 in (False, True):
                out[("saved", tp, variant, bf16)] = saved_by_stage(model, cfg, bf16, T)
                out[("saved tiled", tp, variant, bf16)] = saved_by_stage(tiled, cfg, bf16, T)
                out[("saved grouped", tp, variant, bf16)] = saved_by_stage(grouped, cfg, bf16, T)
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure, 2)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count_matches_the_model(measured, tp, variant):
    for res in measured:
        assert stage_params(_cfg(variant), Layout(tp=tp)) == res[("params", tp, variant)]


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_bytes_per_token_match_autograd(measured, tp, variant, bf16):
    cfg = _cfg(variant)
    saved = measured[0][("saved", tp, variant, bf16)]
    for stage in ("L", "N", "mlp"):
        assert saved_per_token(cfg, stage, tp, 2 if bf16 else 4) == saved[stage], stage


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_bytes_per_token_with_tiled_mixers_match_autograd(measured, tp, variant, bf16):
    """memory.mixer_tile (tiles of 16 of the 64 tokens): the mixers keep their input and the attention's
    tensors only, fewer bytes than untiled."""
    cfg = _cfg(variant)
    saved = measured[0][("saved tiled", tp, variant, bf16)]
    act = 2 if bf16 else 4
    for stage in ("L", "N"):
        assert saved_per_token(cfg, stage, tp, act, mixer_tile=True) == saved[stage], stage
        assert saved[stage] < saved_per_token(cfg, stage, tp, act), stage


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_bytes_per_token_with_head_groups_match_autograd(measured, tp, variant, bf16):
    """memory.mixer_head_groups = 2 (with mixer_tile): the linear mixers keep their float32 input only, the
    softmax mixers their input and RoPE's float32 cos/sin."""
    cfg = _cfg(variant)
    saved = measured[0][("saved grouped", tp, variant, bf16)]
    act = 2 if bf16 else 4
    assert saved_per_token(cfg, "L", tp, act, mixer_tile=True, head_groups=2) == saved["L"] == 4 * cfg.dim
    grouped = saved_per_token(cfg, "N", tp, act, mixer_tile=True, head_groups=2)
    assert grouped == saved["N"] == 4 * cfg.dim + 8 * cfg.hd
    assert saved["N"] < saved_per_token(cfg, "N", tp, act, mixer_tile=True)


def test_head_groups_lower_the_linear_mixers_backward():
    """One group's attention tensors and gradients instead of all heads': the linear block's backward transient
    falls with the groups, by the hand count below (bf16, lightning, mixer_tile, offload)."""
    from longscan.training.memory import _block
    m = ModelConfig(dim=256, n_layers=4, pattern="LLLN", n_heads=8, n_kv_heads=2, vocab_size=1000, ffn_dim=64)
    N, tile, I, D = 1 << 16, 1024, 256, 256
    mem = MemoryOptions("offload", "offload", "offload", mixer_tile=tile, mlp_tile=tile)  # the mixer sets it
    whole = _block(m, "L", mem, False, 1, 2, N)[1]
    for groups in (2, 4, 8):
        held, grouped = _block(m, "L", MemoryOptions("offload", "offload", "offload", mixer_tile=tile, mlp_tile=tile,
                                                     mixer_head_groups=groups), False, 1, 2, N)
        Ig = I // groups
        # q, k, v, output and their gradients for one group; around them one tile of the norm's output, q, k
        # before SiLU, the output norm's 1/rms and o_proj's input; the input brought back and the one before
        per_tile = 2 * D + 4 + 2 * 2 * Ig + 4 * (8 // groups) + 2 * Ig
        assert held == 0 and grouped == 8 * 2 * Ig * N + per_tile * tile + 2 * 4 * D * N
        assert grouped < whole


def test_head_groups_lower_the_softmax_mixers_backward():
    """The same for a softmax block (GQA, 4 KV heads): one group's q, k, v, output, lse and their gradients
    instead of all heads', by the hand count below (bf16, mixer_tile, offload)."""
    from longscan.training.memory import _block
    m = ModelConfig(dim=256, n_layers=4, pattern="LLLN", n_heads=8, n_kv_heads=4, vocab_size=1000, ffn_dim=64)
    N, tile, I, Ikv, D, hd = 1 << 16, 1024, 256, 128, 256, 32
    whole = _block(m, "N", MemoryOptions("offload", "offload", "offload", mixer_tile=tile, mlp_tile=tile),
                   False, 1, 2, N)[1]
    for groups in (2, 4):
        held, grouped = _block(m, "N", MemoryOptions("offload", "offload", "offload", mixer_tile=tile, mlp_tile=tile,
                                                     mixer_head_groups=groups), False, 1, 2, N)
        Ig, Ikvg, Hg = I // groups, Ikv // groups, 8 // groups
        # q, k, v, output (bf16) and their gradients, float32 lse; one tile of the norm's output and 1/rms; the
        # input brought back and the one before (RoPE's tables are the model's, not made again: not counted here)
        assert held == 0
        assert grouped == (2 * 2 * (2 * Ig + 2 * Ikvg) + 4 * Hg) * N + (2 * D + 4) * tile + 2 * 4 * D * N
        assert grouped < whole


def test_the_1m_config_with_head_groups():
    """configs/hybrid_1b_1m.yaml (every stage offloaded in float32) runs its mixers (linear and softmax) by
    memory.mixer_head_groups = 4: against all heads at once the prediction (its 10% margin in) falls by over
    10 GiB (85.6 to 75.5), to under an 80 GB GPU's 79.1 GiB (docs/memory.md); the softmax block's backward is
    no longer near the peak."""
    from longscan.training.config import validate
    from longscan.training.memory import _block
    cfg = validate(load_config(CONFIG_1M, PER_STAGE_1M), 1)
    base = validate(load_config(CONFIG_1M, PER_STAGE_1M + ["memory.mixer_head_groups=0"]), 1)
    assert cfg.memory.mixer_head_groups == 4
    before, after = estimate_config(base, 1), estimate_config(cfg, 1)
    assert before.moment == "block 0 backward" and after.moment == "block 0 backward"
    assert after.peak < before.peak - 10 * GiB
    assert after.peak < 79.1 * GiB < before.peak
    N = cfg.data.seq_len
    soft = [_block(c.model, "N", c.memory.options(), False, 1, 2, N)[1] for c in (base, cfg)]
    assert soft[1] < soft[0] - 12 * GiB  # the softmax block's transient: one group of its attention tensors


def test_hand_counted_parameters():
    m = ModelConfig(dim=8, n_layers=2, pattern="LN", n_heads=2, n_kv_heads=1, ffn_dim=16, vocab_size=64,
                    pad_vocab_to=64)
    # L: norms 2·8, MLP 3·8·16, q/k/v 3·8·8, out norm 8, o 8·8;  N: norms, MLP, q 8·8, k/v 2·8·4, o 8·8
    assert layer_params(m, "L", 1) == 16 + 384 + 192 + 8 + 64
    assert layer_params(m, "N", 1) == 16 + 384 + 64 + 64 + 64
    assert stage_params(m, Layout()) == 664 + 592 + 64 * 8 + 8 + 64 * 8
    assert stage_params(m, Layout(pp=2)) == 664 + 512  # first stage: embedding, no head
    assert layer_params(m, "L", 2) == 16 + 192 + 96 + 4 + 32


def test_hand_counted_loss():
    m = ModelConfig(dim=16, vocab_size=1000, pad_vocab_to=8)
    N = 4096
    held, peak = loss_bytes(m, 1, 2, N, 0)
    assert held == 4 * 1000 * N + 4 * 16 * N and peak == 2 * 1000 * N  # float32 softmax; bf16 logits beside it
    held, peak = loss_bytes(m, 2, 2, N, 256)
    # float32 hidden states, their bf16 gradient, the float32 weight gradient; one chunk of half the vocabulary
    assert held == (4 + 2) * 16 * N + 4 * 500 * 16 and peak == 14 * 256 * 500
    assert loss_bytes(m, 1, 4, N, 0)[1] == 0  # float32 logits are the softmax's buffer


def test_memory_options_lower_the_peak():
    cfg = load_config(CONFIG_1B, ["parallel.sp=1", "data.seq_len=131072", "memory.loss_chunk=0"])
    m, lay = cfg.model, Layout(seq_len=131072)
    whole = estimate(m, lay, MemoryOptions(), whole_block_checkpointing=True)
    assert whole.peak == estimate_config(cfg, 1, reserve=0).peak  # the config path is the same estimate
    chunked = estimate(m, lay, MemoryOptions(loss_chunk=4096), whole_block_checkpointing=True)
    assert whole.moment == "loss backward" and "loss (transient)" in whole.parts  # the float32 logits set it
    assert chunked.peak < whole.peak and chunked.moment.startswith("block")  # now a block's recompute does
    none = estimate(m, lay, MemoryOptions(loss_chunk=4096))
    ck = estimate(m, lay, MemoryOptions("checkpoint", "checkpoint", "checkpoint", loss_chunk=4096))
    off = estimate(m, lay, MemoryOptions("offload", "offload", "offload", loss_chunk=4096))
    tiled = estimate(m, lay, MemoryOptions("offload", "offload", "offload", mlp_tile=8192, loss_chunk=4096))
    mixers = estimate(m, lay, MemoryOptions("offload", "offload", "offload", mlp_tile=8192, loss_chunk=4096,
                                            mixer_tile=8192))
    assert none.peak > ck.peak > off.peak > tiled.peak > mixers.peak
    # offload at 131072 tokens: 20 blocks hold nothing; the peak is one block's recompute plus model states
    assert off.parts["saved activations"] < ck.parts["saved activations"] / 10
    lay8 = Layout(seq_len=131072, pp=4, microbatches=8)
    assert estimate(m, lay8, MemoryOptions()).parts["saved activations"] > 0


def test_capacity_check_names_the_options_and_the_prediction():
    cfg = load_config(CONFIG_1B, ["parallel.sp=1", "data.seq_len=1048576"])
    with pytest.raises(ConfigError) as e:
        check_capacity(cfg, 1, capacity_bytes=80 * GiB)
    msg = str(e.value)
    assert "predicted peak memory" in msg and "exceeds the device's 80.0 GiB" in msg
    assert "memory.check_capacity=false" in msg and "memory.loss_chunk" in msg
    assert check_capacity(load_config(CONFIG_1B), 8, capacity_bytes=80 * GiB) is not None
    off = load_config(CONFIG_1B, ["parallel.sp=1", "data.seq_len=1048576",
                                                      "memory.check_capacity=false"])
    assert check_capacity(off, 1, capacity_bytes=80 * GiB) is None


def test_cpu_runs_are_checked_against_the_host():
    """On CPU every rank process holds its states and activations in host memory: the node's processes together
    must fit the host's memory."""
    cfg = load_config(CONFIG_1B, ["parallel.sp=1", "data.seq_len=1048576"])
    with pytest.raises(ConfigError) as e:
        check_capacity(cfg, 1, host_bytes=24 * GiB, procs_per_node=1, device_type="cpu")
    msg = str(e.value)
    assert "predicted peak memory" in msg and "× 1 process(es) exceeds the host's 24.0 GiB" in msg
    assert "a CPU run" in msg and "memory.check_capacity=false" in msg and "| **peak** |" in msg
    small = validate(load_config(None, []), 4)   # the embedded default: four processes
    one = check_capacity(small, 4, host_bytes=4 * GiB, procs_per_node=4, device_type="cpu")
    assert one is not None and 4 * one.peak < 4 * GiB
    assert one.peak == estimate_config(small, 4, device_type="cpu").peak
    with pytest.raises(ConfigError, match=r"× 4 process\(es\)"):   # each fits alone, not four together
        check_capacity(small, 4, host_bytes=2 * one.peak, procs_per_node=4, device_type="cpu")
    off = load_config(CONFIG_1B, ["parallel.sp=1", "data.seq_len=1048576", "memory.check_capacity=false"])
    assert check_capacity(off, 1, host_bytes=GiB, procs_per_node=1, device_type="cpu") is None


@pytest.mark.parametrize("overrides, message", [
    (["memory.mlp=recompute"], "memory.mlp = 'recompute' is not allowed; choose one of none, checkpoint, offload"),
    (["memory.loss_chunk=-1"], "memory.loss_chunk must be >= 0"),
    (["memory.linear_layers=offload", "schedule.activation_checkpointing=true"], "schedule.activation_checkpointing"),
])
def test_bad_memory_config(overrides, message):
    from longscan.training.config import validate
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(load_config(None, overrides), 4)


def _bench():
    import importlib.util
    path = os.path.join(REPO, "benchmarks", "train_memory.py")
    spec = importlib.util.spec_from_file_location("train_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def test_benchmark_search_doubles_then_bisects():
    bench, _ = _bench()

    class Fits:  # fits up to 1000 tokens
        def __init__(self):
            self.tried = []

        def run(self, T, steps, warmup):
            self.tried.append(T)
            return {"seq_len": T, "status": "ok" if T <= 1000 else "OOM"}
    r = Fits()
    longest, rows = bench.search_max(r, 64, bench.parse(["--tiny", "--max", "--granularity", "64"]))
    assert longest == 960 and r.tried[:5] == [64, 128, 256, 512, 1024] and len(rows) == len(r.tried)
    assert "| lightning | 1,024 | — |" in bench.table([dict(rows[4], variant="lightning", predicted=1.0)])


def test_benchmark_cpu_path_prints_its_table():
    import subprocess
    import sys
    _, path = _bench()
    out = subprocess.run([sys.executable, path, "--tiny", "--variants", "lightning", "--seq-lens", "64",
                          "--steps", "1", "--warmup", "0", "memory.loss_chunk=16", "memory.mlp_tile=16",
                          "memory.mixer_tile=16"],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| lightning | 64 |")]
    assert rows and rows[-1].endswith("| ok |")
    assert float(rows[-1].split("|")[3].replace(",", "")) > 0  # tokens/s


def test_the_1m_config_fits_80gb():
    """configs/hybrid_1b_1m.yaml with every stage offloaded in float32: 1,048,576 tokens on one GPU; the estimate
    (its 10% margin in) is under an H100's 79.1 GiB, as docs/memory.md says; without head groups it is over it and
    under an H200's memory; there mixer_tile saves over 10 GiB of it."""
    from longscan.training.config import validate
    cfg = validate(load_config(CONFIG_1M, PER_STAGE_1M), 1)
    assert cfg.data.seq_len == 1 << 20 and cfg.parallel.sp == 1 and cfg.memory.mixer_tile > 0
    assert check_capacity(cfg, 1, capacity_bytes=int(79.1 * GiB)) is not None
    ungrouped = validate(load_config(CONFIG_1M, PER_STAGE_1M + ["memory.mixer_head_groups=0"]), 1)
    assert check_capacity(ungrouped, 1, capacity_bytes=int(139.7 * GiB)) is not None
    with pytest.raises(ConfigError, match="memory.mixer_tile"):
        check_capacity(ungrouped, 1, capacity_bytes=int(79.1 * GiB))
    untiled = validate(load_config(CONFIG_1M, PER_STAGE_1M + ["memory.mixer_head_groups=0", "memory.mixer_tile=0"]),
                       1)
    assert estimate_config(untiled, 1).peak > estimate_config(ungrouped, 1).peak + 10 * GiB
