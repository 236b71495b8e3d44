"""memory.recompute_blocks: only the first N blocks of a pipeline stage follow the memory modes.

One spawn of one gloo process builds the tiny hybrid (LLLN, float32) with the same weights for every N and
every recomputing mode (per-stage checkpoint and offload, whole blocks checkpointed or offloaded,
schedule.activation_checkpointing) and runs one forward and backward each: the loss and every gradient equal
those of the model that recomputes every block (bitwise: the recomputation runs the same ops on the same
inputs); each block's mixer and MLP run twice exactly where the block follows the modes; the bytes each block
saves for its backward, measured through autograd's saved-tensor hooks, are the estimator's count for that block
with its own options; an offloaded input waits in the stash for the recomputing blocks only. The last of two
pipeline stages counts its own blocks.
"""
from __future__ import annotations

import pytest
import torch

from harness import run_distributed
from longscan.models.args import MemoryOptions, ModelConfig
from longscan.training.config import ConfigError, load_config, validate
from longscan.training.memory import (GiB, Layout, _block, check_capacity, estimate, estimate_config,
                                      offloaded_host_bytes)
from longscan.training.offload import stashes_in_graph

T = 64  # a whole chunk of the torch backend: no padding among the saved tensors
LAYERS = 4
# name -> (memory options, schedule.activation_checkpointing)
MODES = {
    "stages checkpoint": (dict(linear_layers="checkpoint", softmax_layers="checkpoint", mlp="checkpoint"), False),
    "stages offload": (dict(linear_layers="offload", softmax_layers="offload", mlp="offload"), False),
    "mixers checkpoint": (dict(linear_layers="checkpoint", softmax_layers="checkpoint"), False),
    "blocks checkpoint": (dict(blocks="checkpoint"), False),
    "blocks offload": (dict(blocks="offload"), False),
    "activation checkpointing": (dict(), True),
}
COUNTS = (-1, 0, 1, 3, LAYERS)


def _cfg():
    return ModelConfig(dim=32, n_layers=LAYERS, pattern="LLLN", n_heads=4, n_kv_heads=2, linear_variant="lightning",
                       vocab_size=100)


def _model(memory, whole):
    from longscan.models.model import HybridLM, SPSpec
    from longscan.training.parallel import stage_config
    cfg = _cfg()
    return HybridLM(cfg, stage_config(1, 1, 1, cfg.dim, torch.float32), SPSpec(linear_backend="torch"), seed=0,
                    activation_checkpointing=whole, memory=memory).train()


def _saved_by_block(model, tokens) -> list[int]:
    """Bytes of the distinct storages saved for the backward in one forward, by block: what is saved after block
    i - 1 returns (a whole-block checkpoint's input included) and before block i returns is block i's."""
    params = {id(p.untyped_storage()) for p in (*model.parameters(), *model.buffers())}
    seen: dict = {}
    current = [None]

    def pack(t):
        sid = id(t.untyped_storage())
        if current[0] is not None and sid not in params and sid not in seen:
            seen[sid] = (current[0], t.untyped_storage().nbytes())
        return t

    def done(i):
        def hook(module, args, out):
            current[0] = i + 1 if i + 1 < LAYERS else None  # after the last block: the loss's, not counted
        return hook
    hooks = [model.embed.register_forward_hook(lambda m, a, o: current.__setitem__(0, 0))]
    hooks += [b.register_forward_hook(done(i)) for i, b in enumerate(model.layers.values())]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    for h in hooks:
        h.remove()
    del loss
    out = [0] * LAYERS
    for block, nbytes in seen.values():
        out[block] += nbytes
    return out


def _step(model, tokens):
    """Loss, gradients by name, the forward calls of each block's mixer and MLP over the step, and the host
    bytes each stash held."""
    calls = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, key=(i, part): calls.__setitem__(key, calls.get(key, 0) + 1))
             for i, b in enumerate(model.layers.values()) for part, m in (("mixer", b.attn), ("mlp", b.mlp))]
    loss = model(tokens[:, :-1], tokens[:, 1:]).float().mean()
    held = [[e.host.numel() * e.host.element_size() for e in s.entries] for s in stashes_in_graph(loss)]
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, calls, held


def _run(rank, world):
    from megatron.core import parallel_state as ps
    ps.initialize_model_parallel(1, create_gloo_process_groups=False)
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (1, T + 1))
    out = {"kept": _step(_model(MemoryOptions(), False), tokens)}
    for name, (options, whole) in MODES.items():
        for n in COUNTS:
            memory = MemoryOptions(recompute_blocks=n, **options)
            out[(name, n)] = _step(_model(memory, whole), tokens)
            out[("saved", name, n)] = _saved_by_block(_model(memory, whole), tokens)
    out["second stage"] = {n: _second_stage(n, tokens) for n in (-1, 1)}
    ps.destroy_model_parallel()
    return out


def _second_stage(n, tokens):
    """The last of two pipeline stages (blocks 2 and 3), its stages checkpointed, on a random input from the
    stage before: the step's loss, gradients (its input's too) and forward calls."""
    from longscan.models.model import HybridLM, SPSpec
    from longscan.training.parallel import stage_config
    cfg = _cfg()
    memory = MemoryOptions(**MODES["stages checkpoint"][0], recompute_blocks=n)
    model = HybridLM(cfg, stage_config(1, 2, 1, cfg.dim, torch.float32), SPSpec(linear_backend="torch"), seed=0,
                     pp_rank=1, pp_size=2, memory=memory).train()
    x = torch.randn(T, 1, cfg.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    model.set_input_tensor(x)
    loss, grads, calls, _ = _step(model, tokens)
    return loss, {**grads, "input": x.grad.clone()}, calls


@pytest.fixture(scope="module")
def results():
    return run_distributed(_run, 1)[0]


CASES = [(name, n) for name in MODES for n in COUNTS]


@pytest.mark.parametrize("name,n", CASES)
def test_some_blocks_kept_give_the_same_loss_and_gradients(results, name, n):
    loss, grads, _, _ = results[(name, n)]
    for ref_loss, ref_grads, _, _ in (results[(name, -1)], results["kept"]):
        assert torch.isfinite(ref_loss) and torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for key in ref_grads:
            assert ref_grads[key].abs().sum() > 0, key  # every parameter takes part
            assert torch.equal(grads[key], ref_grads[key]), key


@pytest.mark.parametrize("name,n", CASES)
def test_only_the_first_blocks_recompute(results, name, n):
    options, whole = MODES[name]
    calls = results[(name, n)][2]
    for i in range(LAYERS):
        follows = n < 0 or i < n
        mixer_again = follows and (whole or options.get("blocks") or "softmax_layers" in options)
        mlp_again = follows and (whole or options.get("blocks") or "mlp" in options)
        assert calls[(i, "mixer")] == 1 + bool(mixer_again), (i, calls)
        assert calls[(i, "mlp")] == 1 + bool(mlp_again), (i, calls)


@pytest.mark.parametrize("name,n", CASES)
def test_saved_bytes_by_block_are_the_estimators(results, name, n):
    """Each block saves what the estimator counts for it: a kept block everything its modules save, a recomputing
    one its stages' (or its own) input on the device, an offloaded one nothing."""
    options, whole = MODES[name]
    memory = MemoryOptions(recompute_blocks=n, **options)
    m = _cfg()
    want = [_block(m, m.layer_kind(i), memory.for_block(i), whole and memory.follows_modes(i), 1, 4, T)[0]
            for i in range(LAYERS)]
    # RoPE's cos/sin are the model's, one pair for every softmax mixer: the estimator counts them once beside the
    # blocks, the hooks in the first block that keeps a softmax mixer's tensors
    keeps = [i for i in range(LAYERS) if m.layer_kind(i) == "N" and memory.for_block(i).softmax_layers == "none"
             and not (whole and memory.follows_modes(i)) and memory.for_block(i).blocks == "none"]
    if keeps:
        want[keeps[0]] += 8 * m.hd * T
    assert results[("saved", name, n)] == want
    kept = _block(m, "L", MemoryOptions(), False, 1, 4, T)[0]
    assert want[0] < kept if n != 0 else want[0] == kept  # the test tells recomputing blocks from kept ones


@pytest.mark.parametrize("name,n", [c for c in CASES if "offload" in c[0]])
def test_only_recomputing_blocks_offload_their_inputs(results, name, n):
    options, _ = MODES[name]
    held = results[(name, n)][3]
    per_block = 1 if "blocks" in options else 2
    one = 4 * 32 * T
    recomputing = LAYERS if n < 0 else n
    assert held == ([[one] * (per_block * recomputing)] if recomputing else [])
    memory = MemoryOptions(recompute_blocks=n, **options)
    assert sum(offloaded_host_bytes(_cfg(), Layout(seq_len=T), memory, pinned=False).values()) == (
        per_block * recomputing * one)


@pytest.mark.parametrize("options,whole", list(MODES.values()), ids=list(MODES))
def test_estimate_of_all_and_of_none(options, whole):
    """recompute_blocks = the blocks of a stage is -1; 0 is every mode none (the same parts, moment and host)."""
    m, lay = _cfg(), Layout(seq_len=4096, pp=2, microbatches=4)
    every = estimate(m, lay, MemoryOptions(**options), whole_block_checkpointing=whole)
    same = estimate(m, lay, MemoryOptions(recompute_blocks=LAYERS // 2, **options), whole_block_checkpointing=whole)
    assert (every.parts, every.moment, every.host) == (same.parts, same.moment, same.host)
    none = estimate(m, lay, MemoryOptions())
    zero = estimate(m, lay, MemoryOptions(recompute_blocks=0, **options), whole_block_checkpointing=whole)
    assert (none.parts, none.moment, none.host) == (zero.parts, zero.moment, zero.host)
    assert every.peak < none.peak


GPU_1B = ["parallel.sp=1", "data.seq_len=65536", "schedule.activation_checkpointing=false",
          "memory.linear_layers=checkpoint", "memory.mlp=checkpoint"]


def test_the_1b_hybrid_at_64k_grows_with_the_kept_blocks():
    """configs/hybrid_1b_gpu.yaml on one GPU at 65,536 tokens (docs/memory.md): each kept block adds its saved
    activations; 13 recomputing blocks fit an 80 GB GPU's 79.1 GiB with the capacity check's margin, 12 do not."""
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                        "hybrid_1b_gpu.yaml")
    peaks = {n: estimate_config(validate(load_config(path, GPU_1B + [f"memory.recompute_blocks={n}"]), 1), 1).peak
             for n in (20, 16, 13, 12, 8, 0)}
    assert peaks[20] == estimate_config(validate(load_config(path, GPU_1B), 1), 1).peak
    assert peaks[20] < peaks[16] < peaks[13] < peaks[12] < peaks[8] < peaks[0]
    assert peaks[13] < 79.1 * GiB < peaks[12]
    with pytest.raises(ConfigError, match=r"a larger memory.recompute_blocks \(now 12"):
        check_capacity(validate(load_config(path, GPU_1B + ["memory.recompute_blocks=12"]), 1), 1,
                       capacity_bytes=int(79.1 * GiB))
    nothing = validate(load_config(path, GPU_1B + ["memory.linear_layers=none", "memory.mlp=none"]), 1)
    assert peaks[0] == estimate_config(nothing, 1).peak


@pytest.mark.parametrize("overrides,message", [
    (["memory.recompute_blocks=-2"], "memory.recompute_blocks must be -1"),
    (["memory.recompute_blocks=5"], r"memory.recompute_blocks = 5 exceeds the blocks of a pipeline stage"),
    (["memory.recompute_blocks=3", "parallel.pp=2", "parallel.sp=2"], r"model.n_layers / parallel.pp = 4/2 = 2"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, overrides), 4)
    with pytest.raises(ValueError, match="memory.recompute_blocks"):
        MemoryOptions(recompute_blocks=-2)


def test_plan_counts_only_the_recomputing_blocks(tmp_path):
    """`longscan plan`'s time model: the recomputed forward of two recomputing blocks (LL of LLLN, both stages
    checkpointed) is their matmuls' third and two thirds of the linear kernels' forward share; all four are the
    default; none is nothing."""
    import json

    from longscan.observe import plan as P
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"gpu": "test", "memory_bytes": 8 * GiB, "matmul_flops_per_s": 1e14,
                                "linear_s_per_token_head": {"lightning": {"64": 2e-9}},
                                "softmax_s_per_pair_head": {"64": 3e-12}, "copy_bytes_per_s": 1e12}))
    costs = P.costs_for("h100", str(path))
    model = ["model.dim=256", "model.n_heads=4", "model.n_kv_heads=4", "model.n_layers=4", "model.pattern=LLLN",
             "data.global_batch_size=4", "data.seq_len=4096", "parallel.sp=1", "memory.linear_layers=checkpoint",
             "memory.softmax_layers=checkpoint", "memory.mlp=checkpoint"]
    parts = {n: P.compute_parts(validate(load_config(None, model + [f"memory.recompute_blocks={n}"]), 1), costs)
             for n in (-1, 4, 2, 0)}
    assert parts[4] == parts[-1] and parts[0]["recomputed forward"] == 0
    c = validate(load_config(None, model), 1)
    m, tokens = c.model, 4 * 4096
    D, I, F = m.dim, m.n_heads * m.hd, m.ffn
    want = tokens * 2 * 2 * (4 * D * I + 3 * D * F) / 1e14 + P.LINEAR_FWD_SHARE * parts[2]["linear attention"] * 2 / 3
    assert parts[2]["recomputed forward"] == pytest.approx(want)
    assert parts[0]["memory-bound"] < parts[2]["memory-bound"] < parts[4]["memory-bound"]


def test_a_later_pipeline_stage_counts_its_own_blocks(results):
    """recompute_blocks counts the blocks of each stage: on the second of two stages (blocks 2 and 3) N = 1
    recomputes block 2 only, and gives the loss and gradients (its input's too) of recomputing both."""
    loss, grads, calls = results["second stage"][1]
    ref_loss, ref_grads, ref_calls = results["second stage"][-1]
    assert ref_calls == {(i, part): 2 for i in (0, 1) for part in ("mixer", "mlp")}
    assert calls == {(0, "mixer"): 2, (0, "mlp"): 2, (1, "mixer"): 1, (1, "mlp"): 1}
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for key in ref_grads:
        assert ref_grads[key].abs().sum() > 0 and torch.equal(grads[key], ref_grads[key]), key
