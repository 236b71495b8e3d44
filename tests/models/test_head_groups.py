"""memory.mixer_head_groups: a mixer (linear or softmax attention) run one head group at a time equals the mixer
on all heads, forward and backward.

Float64: ``head_groups`` against the plain per-head sum on random inputs (a token-mixing middle, tiles that do
not divide T); then the model's loss and every gradient with head groups against the same model without them,
for each linear variant that takes them, in a hybrid with a GQA softmax layer (8 query heads, 4 KV heads): on
one process (groups of 2 and 4 heads, with mixer_tile, with the mixer stage checkpointed and offloaded), over
SP 4 (every linear SP method and both layouts; softmax layers over ring, allgather and, with DeepSpeed,
ulysses) and over TP 2 × SP 2, all in one spawn of four gloo processes. The gradients are each rank's own
(before any reduction), so every rank's tensors are compared. Under bf16 autocast, to bf16 round-off. And the
memory: the profiler's peak of a mixer's forward and backward (linear and softmax) with head groups against
all heads at once.
"""
from __future__ import annotations

import pytest
import torch

from harness import rel_err, run_distributed, tp_model
from longscan.models.tiling import head_groups

VARIANTS = ("linear", "lightning", "simple_gla", "gla")
TOL = 1e-12


def test_head_groups_equals_the_sum_over_heads():
    """A toy mixer with 4 heads: per-head projections, a causal cumsum over tokens, an output projection;
    2 groups in tiles of 5 of 23 tokens against all heads at once."""
    g = torch.Generator().manual_seed(0)
    B, T, D, H, K = 2, 23, 6, 4, 3
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    wi = torch.randn(H * K, D, generator=g, dtype=torch.float64)
    wo = torch.randn(D, H * K, generator=g, dtype=torch.float64)
    gy = torch.randn(B, T, D, generator=g, dtype=torch.float64)

    def pre(j, xt, wi_, wo_):
        return (torch.tanh(xt @ wi_[j * 2 * K:(j + 1) * 2 * K].T),)

    def mid(j, u):
        return torch.cumsum(u, dim=1) * (j + 1)

    def post(j, zt, wi_, wo_):
        return torch.sin(zt) @ wo_[:, j * 2 * K:(j + 1) * 2 * K].T

    def run(f):
        xr, wir, wor = (t.clone().requires_grad_() for t in (x, wi, wo))
        y = f(xr, wir, wor)
        y.backward(gy)
        return [y.detach(), xr.grad, wir.grad, wor.grad]
    ref = run(lambda xr, wir, wor: sum(post(j, mid(j, *pre(j, xr, wir, wor)), wir, wor) for j in range(2)))
    for tile in (5, 23):
        out = run(lambda xr, wir, wor: head_groups(pre, mid, post, xr, (wir, wor), 2, tile))
        for a, b in zip(out, ref):
            assert rel_err(a, b) < TOL
    with pytest.raises(ValueError, match="groups must be a positive"):
        head_groups(pre, mid, post, x, (wi, wo), 0, 5)


def _step(cfg, mem, tokens, sp, tp, tp_rank, dtype=torch.float64, bf16=False, docs=None):
    """Loss and every gradient (this rank's) of one forward/backward of the model; docs: packed documents
    (cu_seqlens, the local tokens' in-document positions)."""
    model = tp_model(cfg, sp, tp, tp_rank=tp_rank, memory=mem).to(dtype)
    with torch.no_grad():  # norm weights away from 1, so their gradients matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9), dtype=p.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(tokens, tokens, *(docs or ()))
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss))
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def _mixer_peak(mem: "MemoryOptions", T: int, pattern: str = "L") -> float:
    """Peak bytes of CPU memory during one mixer stage's forward and backward (the profiler's timeline of every
    allocation): 8 heads of 32 (softmax: 8 KV heads), width 64, float32, so the `[T, H·K]` attention tensors
    dominate."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    from longscan.models.args import ModelConfig, SPSpec
    from longscan.models.model import Block
    from longscan.models.rope import rope_cos_sin
    from longscan.training.parallel import stage_config
    cfg = ModelConfig(dim=64, n_layers=1, pattern=pattern, n_heads=8, n_kv_heads=8, head_dim=32,
                      linear_variant="lightning")
    torch.manual_seed(0)
    block = Block(cfg, stage_config(1, 1, 1, cfg.dim, torch.float32), 0, 0, 1,
                  SPSpec(linear_backend="torch", softmax_backend="torch"), mem)
    x = torch.randn(1, T, cfg.dim, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T), cfg.hd, cfg.rope_theta)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        y = block._mixer(x, cos, sin, None)
        y.backward(torch.ones_like(y))
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return float(np.array(sizes).sum(axis=1).max())


def _cfg(variant, pattern="LLN", n_layers=3, n_kv_heads=4):
    from longscan.models.args import ModelConfig
    return ModelConfig(dim=16, n_layers=n_layers, pattern=pattern, n_heads=8, n_kv_heads=n_kv_heads, head_dim=4,
                       linear_variant=variant, vocab_size=64)


CU = [torch.tensor([0, 7, 30, 48]), torch.tensor([0, 19, 20, 48])]  # documents of each of the 2 rows


def _documents(layout="contiguous", group=None):
    """cu_seqlens (global) and the local tokens' in-document positions `[2, T]` for this rank's shard."""
    from longscan.parallel import shard
    pos = torch.stack([torch.cat([torch.arange(int(b - a)) for a, b in zip(cu[:-1], cu[1:])]) for cu in CU])
    return CU, pos if group is None else shard(pos, dim=1, layout=layout, group=group)


def _cases(rank, world):
    from megatron.core import parallel_state as ps

    from longscan.models.args import MemoryOptions, SPSpec
    from longscan.parallel import shard
    out = {}
    tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(8))
    mems = {"whole": MemoryOptions(), "g2": MemoryOptions(mixer_head_groups=2),
            "g4+tile": MemoryOptions(mixer_head_groups=4, mixer_tile=5),
            "g2+tile+ckpt": MemoryOptions("checkpoint", mixer_head_groups=2, mixer_tile=7),
            "g4+offload": MemoryOptions("offload", "offload", "offload", mixer_head_groups=4)}

    # SP 4: every variant (zeco, zigzag), then every method and layout (lightning); this rank's shard
    ps.initialize_model_parallel(context_parallel_size=4, create_gloo_process_groups=False)
    group = ps.get_context_parallel_group()
    for variant in VARIANTS:
        sp = SPSpec(group=group, linear_backend="torch", softmax_backend="torch")
        local = shard(tokens, dim=1, layout="zigzag", group=group)
        for name in ("whole", "g4+tile", "g2+tile+ckpt"):
            out[("sp4", variant, name)] = _step(_cfg(variant, "L", 2), mems[name], local, sp, 1, 0)
    for method in ("zeco", "lasp2", "lasp1"):
        for layout in ("zigzag", "contiguous"):
            sp = SPSpec(group=group, layout=layout, linear_method=method, linear_backend="torch")
            local = shard(tokens, dim=1, layout=layout, group=group)
            for name in ("whole", "g2"):
                out[("sp4", f"{method}/{layout}", name)] = _step(_cfg("lightning", "L", 2), mems[name], local, sp,
                                                                  1, 0)
    # softmax layers: ring and allgather on GQA (2 groups of 2 KV heads); ulysses on 8 KV heads (4 a group)
    for method, layout in SOFTMAX_CASES:
        if method == "ulysses" and not HAVE_DEEPSPEED:
            continue
        sp = SPSpec(group=group, layout=layout, softmax_method=method, softmax_backend="torch")
        local = shard(tokens, dim=1, layout=layout, group=group)
        cfg = _cfg("lightning", "N", 2, n_kv_heads=8 if method == "ulysses" else 4)
        for name in ("whole", "g2", "g4+tile"):
            if method == "ulysses" and name == "g4+tile":  # 2 KV heads a group cannot shard over 4 ranks
                try:
                    _step(cfg, mems[name], local, sp, 1, 0)
                except ValueError as e:
                    out[("refused", "ulysses")] = str(e)
                continue
            out[("sp4", f"softmax/{method}/{layout}", name)] = _step(cfg, mems[name], local, sp, 1, 0)
    # packed documents reach a grouped softmax mixer (a model without linear layers)
    sp = SPSpec(group=group, softmax_backend="torch")
    local = shard(tokens, dim=1, layout="zigzag", group=group)
    for name in ("whole", "g2+tile+ckpt"):
        out[("sp4", "softmax/documents", name)] = _step(_cfg("lightning", "N", 2), mems[name], local, sp, 1, 0,
                                                        docs=_documents("zigzag", group))
    ps.destroy_model_parallel()

    # TP 2 × SP 2: four heads (two KV heads) a rank, two groups (lightning: each rank's own decays; gla: per-key
    # gates)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2,
                                 create_gloo_process_groups=False)
    group, tp_rank = ps.get_context_parallel_group(), ps.get_tensor_model_parallel_rank()
    sp = SPSpec(group=group, linear_backend="torch", softmax_backend="torch")
    local = shard(tokens, dim=1, layout="zigzag", group=group)
    for variant in ("lightning", "gla"):
        for name, mem in (("whole", mems["whole"]), ("g2+tile", MemoryOptions(mixer_head_groups=2, mixer_tile=5))):
            out[("tp2sp2", variant, name)] = _step(_cfg(variant), mem, local, sp, 2, tp_rank)
    ps.destroy_model_parallel()

    # one process (each rank alone): every variant and stage mode, and on rank 0 bf16 autocast
    ps.initialize_model_parallel(create_gloo_process_groups=False)
    if rank == 1:  # the softmax mixer's peaks, beside rank 0's work
        for name, groups in (("whole", 0), ("g8", 8)):  # softmax: one KV head (of 8) a group
            out[("peak softmax", name)] = _mixer_peak(MemoryOptions(mixer_tile=512, mixer_head_groups=groups), 2048,
                                                      "N")
    sp = SPSpec(linear_backend="torch", softmax_backend="torch")
    for variant in VARIANTS[rank::world]:   # each variant on one rank, the ranks side by side
        for name, mem in mems.items():
            out[("one", variant, name)] = _step(_cfg(variant), mem, tokens, sp, 1, 0)
    if rank == 0:
        # 4 tiles of 256 tokens: the smallest length at which the attention tensors still dominate the peak
        for name, mem in (("whole", MemoryOptions(mixer_tile=256)),
                          ("g4", MemoryOptions(mixer_tile=256, mixer_head_groups=4))):
            out[("peak", name)] = _mixer_peak(mem, 1024)
        for name in ("whole", "g4+tile"):
            out[("one", "softmax/documents", name)] = _step(_cfg("lightning", "N", 2), mems[name], tokens, sp, 1, 0,
                                                            docs=_documents())
        try:  # 4 KV heads do not split into 3 groups
            _step(_cfg("lightning", "N", 1), MemoryOptions(mixer_head_groups=3), tokens, sp, 1, 0)
        except ValueError as e:
            out[("refused", "groups")] = str(e)
        # megatron's layers take no CPU autocast backward: the MLP, loss and softmax mixer tiled in both
        for name, mem, bf16 in (("whole", MemoryOptions(mlp_tile=7, loss_chunk=8, mixer_tile=7), False),
                                ("g2+tile", MemoryOptions("offload", "offload", mlp_tile=7, loss_chunk=8, mixer_tile=7,
                                                          mixer_head_groups=2), True)):
            out[("bf16", "lightning", name)] = _step(_cfg("lightning"), mem, tokens, sp, 1, 0, torch.float32, bf16)
    ps.destroy_model_parallel()
    return out


SOFTMAX_CASES = [("ring", "zigzag"), ("ring", "contiguous"), ("allgather", "zigzag"), ("allgather", "contiguous"),
                 ("ulysses", "zigzag")]
try:
    import deepspeed.sequence.layer  # noqa: F401
    HAVE_DEEPSPEED = True
except Exception:
    HAVE_DEEPSPEED = False


@pytest.fixture(scope="module")
def cases():
    return run_distributed(_cases, 4)


def _check(results, where, variant, names, tol=TOL):
    ranks = [res for res in results if (where, variant, "whole") in res]
    assert len(ranks) == (1 if where in ("one", "bf16") else len(results))
    for res in ranks:
        ref = res[(where, variant, "whole")]
        for name in names:
            out = res[(where, variant, name)]
            assert len(out) == len(ref)
            for i, (a, b) in enumerate(zip(out, ref)):
                assert rel_err(a, b) < tol, (name, i)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_process(cases, variant):
    _check(cases, "one", variant, ("g2", "g4+tile", "g2+tile+ckpt", "g4+offload"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_sp4(cases, variant):
    _check(cases, "sp4", variant, ("g4+tile", "g2+tile+ckpt"))


@pytest.mark.parametrize("method", ["zeco", "lasp2", "lasp1"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_sp4_every_method_and_layout(cases, method, layout):
    _check(cases, "sp4", f"{method}/{layout}", ("g2",))


@pytest.mark.parametrize("method,layout", SOFTMAX_CASES)
def test_sp4_softmax(cases, method, layout):
    """Softmax layers alone (no linear layer to hide them), groups of 2 and 4 KV heads with their query heads."""
    if method == "ulysses" and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed not installed (optional extra)")
    names = ("g2",) if method == "ulysses" else ("g2", "g4+tile")
    _check(cases, "sp4", f"softmax/{method}/{layout}", names)


@pytest.mark.parametrize("where", ["one", "sp4"])
def test_softmax_packed_documents(cases, where):
    """Packed documents (cu_seqlens, in-document RoPE positions) through a grouped softmax mixer: one process
    and SP 4 (ring, zigzag, the stage checkpointed)."""
    _check(cases, where, "softmax/documents", ("g4+tile",) if where == "one" else ("g2+tile+ckpt",))


def test_softmax_groups_refused_in_the_model(cases):
    """Groups that do not divide a softmax mixer's KV heads, or leave ulysses a group it cannot shard."""
    res = cases[0]
    assert "memory.mixer_head_groups = 3 must divide the KV heads per TP rank (4)" in res[("refused", "groups")]
    if HAVE_DEEPSPEED:
        for r in cases:
            assert "leaves 2 KV heads a group" in r[("refused", "ulysses")]


@pytest.mark.parametrize("variant", ["lightning", "gla"])
def test_tp2_sp2(cases, variant):
    _check(cases, "tp2sp2", variant, ("g2+tile",))


def test_bf16_autocast(cases):
    """Under bf16 autocast, recomputed (offload) under it: the float32 step on all heads to bf16 round-off."""
    _check(cases, "bf16", "lightning", ("g2+tile",), tol=3e-2)


def test_one_group_alive_at_a_time(cases):
    """The measured peak of a mixer's forward and backward with 4 head groups (softmax: 8 groups of one KV head)
    is well under half of the peak with all heads at once (the attention's tensors, their gradients and the
    kernel's scratch are per group)."""
    res = {**cases[0], **cases[1]}   # the linear mixer's peaks on rank 0, the softmax mixer's on rank 1
    assert res[("peak", "g4")] < 0.5 * res[("peak", "whole")]
    assert res[("peak softmax", "g8")] < 0.5 * res[("peak softmax", "whole")]


def test_refused_where_it_cannot_run():
    from longscan.training.config import ConfigError, load_config, validate
    with pytest.raises(ConfigError, match="memory.mixer_head_groups = 2 .*deltanet"):
        validate(load_config(None, ["model.linear_variant=deltanet", "memory.mixer_head_groups=2"]), 4)
    with pytest.raises(ConfigError, match="memory.mixer_head_groups = 3 must divide"):
        validate(load_config(None, ["memory.mixer_head_groups=3"]), 4)
    with pytest.raises(ConfigError, match="memory.mixer_head_groups = 2 does not take packed documents"):
        validate(load_config(None, ["memory.mixer_head_groups=2", "data.pack_documents=true"]), 4)
    with pytest.raises(ConfigError, match="memory.mixer_head_groups = 4 must divide the KV heads per TP rank"):
        validate(load_config(None, ["memory.mixer_head_groups=4"]), 4)  # 4 heads, but 2 KV heads
    with pytest.raises(ConfigError, match="memory.mixer_head_groups = 2 leaves 1 KV heads a group.*ulysses"):
        validate(load_config(None, ["memory.mixer_head_groups=2", "parallel.softmax_method=ulysses",
                                    "parallel.sp=2"]), 4)
    with pytest.raises(ConfigError, match="memory.mixer_head_groups must be >= 0"):
        load_config(None, ["memory.mixer_head_groups=-1"])
