"""Whole blocks offloaded (memory.blocks) and the bfloat16 residual stream (model.residual_dtype).

One spawn of one gloo process builds the tiny hybrid with the same weights in every mode and runs one forward
and backward each: block offload and block checkpointing give the loss and gradients of the model that keeps
everything (bitwise: the recomputation runs the same ops on the same inputs), in float32 and with a bf16
residual stream under CPU bf16 autocast; the bf16 stream's loss is that of the float32-stream model whose
blocks are fed bf16 explicitly; every block's input is bf16; the stash holds one input a block, the bytes the
estimator counts; the stages save the bytes the estimator counts. Config errors name their key.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness import rel_err, run_distributed
from longscan.models.args import MemoryOptions, ModelConfig
from longscan.training.config import ConfigError, load_config, validate
from longscan.training.memory import (GiB, Layout, check_capacity, estimate, estimate_config, offloaded_host_bytes,
                                      saved_per_token)
from longscan.training.offload import stashes_in_graph
from training_common import PER_STAGE_1M, saved_by_stage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_1M = os.path.join(REPO, "configs", "hybrid_1b_1m.yaml")
T = 64  # a whole chunk of the torch backend: no padding among the saved tensors
# the tiled / grouped / chunked paths: the ones the 1M config runs, and the ones whose backward runs under CPU
# bf16 autocast (megatron's column and row layers take no CPU bf16 backward)
TILED = dict(mlp_tile=16, mixer_tile=16, mixer_head_groups=2, loss_chunk=24)
MODES = {  # name -> (memory options, bf16 autocast)
    "untiled": (dict(), False),
    "tiled": (TILED, False),
    "tiled bf16": (TILED, True),
}


def _cfg(residual="float32"):
    return ModelConfig(dim=32, n_layers=4, pattern="LLLN", n_heads=4, n_kv_heads=2, linear_variant="lightning",
                       vocab_size=100, residual_dtype=residual)


def _model(cfg, memory):
    from longscan.models.model import HybridLM, SPSpec
    from longscan.training.parallel import stage_config
    return HybridLM(cfg, stage_config(1, 1, 1, cfg.dim, torch.float32), SPSpec(linear_backend="torch"), seed=0,
                    memory=memory)


def _step(model, tokens, bf16):
    """Loss, gradients (by name) and the host bytes its offloaded inputs held, of one forward and backward."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(tokens[:, :-1], tokens[:, 1:]).float().mean()
    stashes = stashes_in_graph(loss)
    held = [[e.host.numel() * e.host.element_size() for e in s.entries] for s in stashes]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, held


def _fed_bf16(model, tokens):
    """The float32-stream model's loss with its blocks fed bf16 by hand: the embedding's output cast once, each
    block called on the previous one's output (no checkpointing), then the final norm and the chunked loss."""
    from longscan.distributed.layouts import positions
    from longscan.models.loss import chunked_cross_entropy
    from longscan.models.rope import rope_cos_sin
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = model.embed(tokens[:, :-1]).to(torch.bfloat16)
        cos, sin = rope_cos_sin(positions(T, None, "zigzag", device=x.device), model.cfg.hd, model.cfg.rope_theta)
        for layer in model.layers.values():
            x = layer(x, cos, sin)
        loss = chunked_cross_entropy(model.norm(x), model.output.weight, tokens[:, 1:], model.memory.loss_chunk,
                                     model.output.tp_group, 0)
    return loss.float().mean().detach()


def _block_inputs(model, tokens):
    """dtypes of every block's input and of the last block's output in a training forward (bf16 autocast)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)) for b in model.layers.values()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    for h in hooks:
        h.remove()
    return seen, loss.dtype


def _run(rank, world):
    from megatron.core import parallel_state as ps
    ps.initialize_model_parallel(1, create_gloo_process_groups=False)
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (1, T + 1))
    out = {}
    for name, (options, bf16) in MODES.items():
        residuals = ("float32", "bfloat16") if bf16 else ("float32",)
        for residual in residuals:
            cfg = _cfg(residual)
            for blocks in ("none", "checkpoint", "offload"):
                model = _model(cfg, MemoryOptions(blocks=blocks, **options)).train()
                out[(name, residual, blocks)] = _step(model, tokens, bf16)
    fed = _model(_cfg(), MemoryOptions(**TILED)).train()
    out["fed bf16"] = _fed_bf16(fed, tokens)
    out["inputs bf16"] = _block_inputs(_model(_cfg("bfloat16"), MemoryOptions(**TILED)).train(), tokens)
    out["inputs float32"] = _block_inputs(_model(_cfg(), MemoryOptions(**TILED)).train(), tokens)
    try:  # a bf16 stream without autocast: the blocks' float32 weights would meet bf16 inputs
        _model(_cfg("bfloat16"), MemoryOptions(**TILED))(tokens[:, :-1], tokens[:, 1:])
        out["no autocast"] = "ran"
    except ValueError as e:
        out["no autocast"] = str(e)
    for residual in ("float32", "bfloat16"):
        for memory in (MemoryOptions(mixer_tile=16), MemoryOptions(mixer_tile=16, mixer_head_groups=2)):
            model = _model(_cfg(residual), memory)
            out[("saved", residual, memory.mixer_head_groups)] = saved_by_stage(model, model.cfg, True, T)
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_run, 1)[0]


CASES = [(name, residual) for name, (_, bf16) in MODES.items() for residual in
         (("float32", "bfloat16") if bf16 else ("float32",))]


@pytest.mark.parametrize("blocks", ["checkpoint", "offload"])
@pytest.mark.parametrize("name,residual", CASES)
def test_whole_blocks_recomputed_give_the_same_loss_and_gradients(results, name, residual, blocks):
    loss, grads, _ = results[(name, residual, blocks)]
    ref_loss, ref_grads, _ = results[(name, residual, "none")]
    assert torch.isfinite(ref_loss) and torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert ref_grads[n].abs().sum() > 0, n  # every parameter takes part
        assert torch.equal(grads[n], ref_grads[n]), n


@pytest.mark.parametrize("name,residual", CASES)
def test_block_offload_stashes_one_input_a_block_as_the_estimator_counts(results, name, residual):
    options, bf16 = MODES[name]
    _, _, held = results[(name, residual, "offload")]
    one = (2 if residual == "bfloat16" else 4) * 32 * T
    assert held == [[one] * 4]  # one stash, an input for each of the 4 blocks
    layout, memory = Layout(seq_len=T), MemoryOptions(blocks="offload", **options)
    assert offloaded_host_bytes(_cfg(residual), layout, memory, pinned=False) == {"blocks": 4 * one}
    assert estimate(_cfg(residual), layout, memory, bf16=bf16, pinned=False).host_bytes == 4 * one
    assert results[(name, residual, "checkpoint")][2] == [] and results[(name, residual, "none")][2] == []


def test_bf16_residual_equals_blocks_fed_bf16_by_hand(results):
    loss = results[("tiled bf16", "bfloat16", "none")][0]
    assert torch.equal(loss, results["fed bf16"])
    float32 = results[("tiled bf16", "float32", "none")][0]
    assert not torch.equal(loss, float32) and rel_err(loss, float32) < 1e-2  # a different model, close to it


def test_every_block_input_is_bf16(results):
    dtypes, loss_dtype = results["inputs bf16"]
    assert dtypes == [torch.bfloat16] * 4 and loss_dtype == torch.float32
    assert results["inputs float32"][0] == [torch.float32] * 4


def test_bf16_residual_without_autocast_is_refused(results):
    assert "model.residual_dtype" in results["no autocast"] and "autocast" in results["no autocast"]


@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("residual", ["float32", "bfloat16"])
def test_saved_bytes_with_the_residual_dtype_match_autograd(results, residual, groups):
    saved = results[("saved", residual, groups)]
    for stage in ("L", "N", "mlp"):
        assert saved_per_token(_cfg(residual), stage, 1, 2, True, max(groups, 1)) == saved[stage], stage


def test_the_1m_config_fits_an_h100_and_a_128_gib_host():
    """configs/hybrid_1b_1m.yaml: 20 blocks offloaded, each a bf16 [1,048,576, 2048] input of 4 GiB, 80 GiB of
    pinned host memory; the GPU's prediction (its 10% margin in) is under an H100's 79.1 GiB. Per-stage offload
    in float32 needed 320 GiB; each of the two options alone halves it."""
    cfg = validate(load_config(CONFIG_1M), 1)
    assert cfg.memory.blocks == "offload" and cfg.model.residual_dtype == "bfloat16"
    est = check_capacity(cfg, 1, capacity_bytes=int(79.1 * GiB), host_bytes=125 * GiB, procs_per_node=1)
    assert est.host == {"blocks": 80 * GiB} and est.peak < 79.1 * GiB
    for over in (["model.residual_dtype=float32"], PER_STAGE_1M + ["model.residual_dtype=bfloat16"]):
        assert estimate_config(validate(load_config(CONFIG_1M, over), 1), 1).host_bytes == 160 * GiB
    assert estimate_config(validate(load_config(CONFIG_1M, PER_STAGE_1M), 1), 1).host_bytes == 320 * GiB


def test_capacity_check_names_the_block_and_residual_options():
    per_stage = validate(load_config(CONFIG_1M, PER_STAGE_1M), 1)
    with pytest.raises(ConfigError) as e:
        check_capacity(per_stage, 1, capacity_bytes=int(79.1 * GiB), host_bytes=125 * GiB, procs_per_node=1)
    assert "memory.blocks=offload" in str(e.value) and "model.residual_dtype=bfloat16" in str(e.value)
    blocks = validate(load_config(CONFIG_1M), 1)
    with pytest.raises(ConfigError) as e:  # two processes a node: 62.5 GiB each
        check_capacity(blocks, 1, capacity_bytes=int(79.1 * GiB), host_bytes=125 * GiB, procs_per_node=2)
    msg = str(e.value)
    assert "80.0 GiB per process (blocks 80.0 GiB)" in msg and "bfloat16 input" in msg
    assert "memory.blocks=offload halves" not in msg and "model.residual_dtype=bfloat16 halves" not in msg


@pytest.mark.parametrize("overrides,key", [
    (["memory.blocks=all"], "memory.blocks"),
    (["memory.blocks=offload", "memory.mlp=offload"], "memory.blocks"),
    (["memory.blocks=offload", "schedule.activation_checkpointing=true"], "memory.blocks"),
    (["model.residual_dtype=float16"], "model.residual_dtype"),
    (["model.residual_dtype=bfloat16", "schedule.precision=fp32"], "model.residual_dtype"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate(load_config(None, overrides), 4)


def test_activation_checkpointing_is_block_checkpointing():
    """schedule.activation_checkpointing = true keeps its meaning: the estimator counts it as memory.blocks =
    checkpoint, and the two together are allowed."""
    m, lay = _cfg(), Layout(seq_len=4096)
    old = estimate(m, lay, MemoryOptions(), whole_block_checkpointing=True)
    new = estimate(m, lay, MemoryOptions(blocks="checkpoint"))
    assert old.parts == new.parts and old.host == new.host == {}
    validate(load_config(None, ["memory.blocks=checkpoint", "schedule.activation_checkpointing=true"]), 4)
    with pytest.raises(ValueError, match="memory.blocks"):
        MemoryOptions(blocks="offload", linear_layers="checkpoint")


def test_benchmark_runs_a_step_with_blocks_offloaded_in_bf16():
    """benchmarks/train_memory.py on CPU (a tiny model, the 1M config's options): one warm-up step at a shorter
    length, one timed step; the host bytes its stash held are the estimator's."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "train_memory.py"), "--tiny",
                          "--variants", "lightning", "--seq-lens", "128", "--steps", "1", "--warmup", "1",
                          "--warmup-seq-len", "64", "memory.blocks=offload", "model.residual_dtype=bfloat16",
                          "schedule.precision=bf16", "memory.mlp_tile=32", "memory.mixer_tile=32",
                          "memory.mixer_head_groups=2", "memory.loss_chunk=32"],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-3000:]
    row = [line for line in out.stdout.splitlines() if line.startswith("| lightning | 128 |")][-1].split("|")
    assert row[-2].strip() == "ok" and float(row[3].replace(",", "")) > 0  # status, tokens/s
    host, predicted_host = float(row[9]), float(row[11])  # GiB, 4 significant digits
    assert host == predicted_host and abs(host * GiB - 4 * 2 * 64 * 128) < 1e-3 * host * GiB  # 4 bf16 [128, 64]


@pytest.mark.parametrize("residual", ["float32", "bfloat16"])
def test_block_offload_backward_by_hand(residual):
    """A linear block offloaded whole (bf16, lightning, tiles of 1024, 2 head groups): nothing held on the GPU;
    its backward holds one head group's attention tensors and gradients (larger than the MLP's input and one
    tile of its backward), one tile around them, its input brought back and the one before on its way."""
    from longscan.training.memory import _block
    m = ModelConfig(dim=256, n_layers=4, pattern="LLLN", n_heads=8, n_kv_heads=2, vocab_size=1000, ffn_dim=64,
                    residual_dtype=residual)
    N, tile, D, Ig, res = 1 << 16, 1024, 256, 128, 2 if residual == "bfloat16" else 4
    mem = MemoryOptions(blocks="offload", mixer_tile=tile, mlp_tile=tile, mixer_head_groups=2)
    held, transient = _block(m, "L", mem, False, 1, 2, N)
    per_tile = 2 * D + 4 + 2 * 2 * Ig + 4 * 4 + 2 * Ig  # the norm's output, q, k before SiLU, 1/rms, o_proj's input
    assert held == 0 and transient == 8 * 2 * Ig * N + per_tile * tile + 2 * res * D * N
    kept = _block(m, "L", MemoryOptions(blocks="checkpoint", mixer_tile=tile, mlp_tile=tile, mixer_head_groups=2),
                  False, 1, 2, N)
    assert kept[0] == res * D * N  # checkpointed whole: the input stays on the GPU
