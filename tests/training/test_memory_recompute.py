"""What an offloaded block's backward holds, measured on CPU against the estimator's named parts.

One gloo process runs a two-block linear model with the 1M config's options (whole blocks offloaded, a bf16
residual stream, head groups, tiles), and with each stage offloaded or a float32 stream instead, under CPU bf16
autocast, its allocations recorded by torch.profiler. The
attention between the head groups' projections is replaced by an elementwise operator that allocates exactly
its output forward and dq, dk, dv backward, so the only tensors of one group's `[T, h, d]` size are those the
model code makes. Two sizes are followed through the step: `[T, D]` in bf16 or float32 (the residual stream,
its gradients, the head groups' float32 sum and its gradient) and one group's `[T, h, d]` in bf16. The peak of
each over the backward is what the estimator counts for the second block's backward (its input brought back,
the first's on its way), plus, on CPU only, the inputs still in the stash (host memory on a GPU).

The same process runs the linear model and a two-block softmax model (GQA; its attention replaced likewise by
an elementwise operator that keeps q, k, v and the output, as flash attention does) without head groups, and the
softmax model with them: the whole backward's peak of those sizes against the estimator's count.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness import run_distributed
from longscan.models.args import MemoryOptions, ModelConfig
from longscan.training.config import load_config, validate
from longscan.training.memory import (GiB, Layout, _block, estimate, estimate_config, recompute_extras,
                                      residual_grads)
from training_common import PER_STAGE_1M

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# head_dim 16: RoPE's float32 [T, head_dim] tables, one tile's tensors and a group's [T, h, d] differ in size
T, D, HEADS, GROUPS, TILE = 2048, 128, 8, 2, 256
IG = D // GROUPS  # one group's q columns
MARKER = 12345  # bytes of an allocation no other tensor has


def _cfg(residual="bfloat16", pattern="L", kv_heads=HEADS, head_dim=0):
    return ModelConfig(dim=D, n_layers=2, pattern=pattern, n_heads=HEADS, n_kv_heads=kv_heads,
                       linear_variant="lightning", vocab_size=64, pad_vocab_to=64, ffn_dim=192,
                       residual_dtype=residual, head_dim=head_dim)


MEMORY = MemoryOptions(blocks="offload", mixer_tile=TILE, mlp_tile=TILE, mixer_head_groups=GROUPS, loss_chunk=TILE)
STAGES = MemoryOptions("offload", "offload", "offload", mixer_tile=TILE, mlp_tile=TILE, mixer_head_groups=GROUPS,
                       loss_chunk=TILE)
# name -> (memory options, residual stream, the offloaded inputs still in the stash at the peak: host memory on
# a GPU)
CASES = {
    "blocks": (MEMORY, "bfloat16", 1),
    "stages": (STAGES, "bfloat16", 2),
    "blocks, float32 stream": (MEMORY, "float32", 1),
    "stages, float32 stream": (STAGES, "float32", 2),
}
BLOCKS = MemoryOptions(blocks="offload", mixer_tile=TILE, mlp_tile=TILE, loss_chunk=TILE)
STAGE_BY_STAGE = MemoryOptions("offload", "offload", "offload", mixer_tile=TILE, mlp_tile=TILE, loss_chunk=TILE)
# name -> (memory options, residual stream, layer pattern, KV heads, head_dim (0: D / heads), the offloaded inputs
# still in the stash at the peak). Softmax: 4 KV heads, so k and v (bf16 [T, 64]) are followed too; with head
# groups 8, so that one group's q, k, v are all bf16 [T, 64]. Half-width heads (q, k, v [T, D/2]): the MLP's
# backward, which holds the branch's bf16 gradient cast from the float32 stream, is the block's peak.
MIXERS = {
    "linear": (BLOCKS, "bfloat16", "L", HEADS, 0, 1),
    "linear, stages": (STAGE_BY_STAGE, "bfloat16", "L", HEADS, 0, 2),
    "linear, float32 stream": (BLOCKS, "float32", "L", HEADS, 0, 1),
    "linear, stages, float32 stream": (STAGE_BY_STAGE, "float32", "L", HEADS, 0, 2),
    "linear, float32 stream, half-width heads": (BLOCKS, "float32", "L", HEADS, D // HEADS // 2, 1),
    "softmax": (BLOCKS, "bfloat16", "N", HEADS // 2, 0, 1),
    "softmax, stages": (STAGE_BY_STAGE, "bfloat16", "N", HEADS // 2, 0, 2),
    "softmax, float32 stream": (BLOCKS, "float32", "N", HEADS // 2, 0, 1),
    "softmax, head groups": (MEMORY, "bfloat16", "N", HEADS, 0, 1),
    "softmax, stages, head groups": (STAGES, "bfloat16", "N", HEADS, 0, 2),
}


class _Elementwise(torch.autograd.Function):
    """o = q·k·v elementwise: one allocation forward (o), three backward (dq, dk, dv)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return torch.mul(q, k).mul_(v)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        return torch.mul(do, k).mul_(v), torch.mul(do, q).mul_(v), torch.mul(do, q).mul_(k)


def _attention(q, k, v, **_):
    return _Elementwise.apply(q, k, v)


class _GroupedElementwise(torch.autograd.Function):
    """o = q·k·v elementwise, each KV head's k and v shared by its query heads (GQA), computed in place: one
    allocation forward (o, kept with q, k, v as flash attention keeps them), three backward (dq, dk, dv)."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, t, hq, d = q.shape
        o = q.clone()
        o.view(B, t, k.shape[2], hq // k.shape[2], d).mul_(k.unsqueeze(3)).mul_(v.unsqueeze(3))
        ctx.save_for_backward(q, k, v, o)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, _ = ctx.saved_tensors
        B, t, hq, d = q.shape
        shared = (B, t, k.shape[2], hq // k.shape[2], d)
        dq = do.clone()
        dq.view(shared).mul_(k.unsqueeze(3)).mul_(v.unsqueeze(3))
        dov, qv = do.view(shared), q.view(shared)
        dk = torch.mul(dov[:, :, :, 0], qv[:, :, :, 0])  # sum over the query heads of do·q, one at a time
        for j in range(1, shared[3]):
            dk.addcmul_(dov[:, :, :, j], qv[:, :, :, j])
        dv = dk.clone()
        return dq, dk.mul_(v), dv.mul_(k)


def _softmax(q, k, v, **_):
    return _GroupedElementwise.apply(q, k, v)


def _peak(events, sizes):
    """The largest sum of live allocations whose size is in ``sizes`` (bytes) during the backward, counting
    from the forward's start (those the forward left alive included)."""
    live, peak, backward = 0, 0, False
    for nbytes in events:
        backward = backward or nbytes == MARKER
        if abs(nbytes) in sizes:
            live += nbytes
            peak = max(peak, live) if backward else peak
    return peak


def _run(rank, world, cases):
    from megatron.core import parallel_state as ps

    from longscan.models import sp_ops
    ps.initialize_model_parallel(1, create_gloo_process_groups=False)
    sp_ops.linear_attention = _attention
    sp_ops.softmax_attention = _softmax
    out = [_events(*case) for case in cases]
    ps.destroy_model_parallel()
    return out


def _events(memory, residual, pattern="L", kv_heads=HEADS, head_dim=0):
    """Allocations (bytes, negative: freed) of one training forward and backward, in order."""
    from torch.profiler import ProfilerActivity, profile

    from longscan.models.model import HybridLM, SPSpec
    from longscan.training.parallel import stage_config
    torch.manual_seed(0)
    cfg = _cfg(residual, pattern, kv_heads, head_dim)
    model = HybridLM(cfg, stage_config(1, 1, 1, D, torch.float32), SPSpec(linear_backend="torch"), seed=0,
                     memory=memory).train()
    tokens = torch.randint(0, cfg.vocab_size, (1, T + 1))
    # an allocation of MARKER bytes marks, among the events, where the blocks' backward starts: once the last
    # block's output has its gradient (the final norm's backward, CPU code unlike the GPU's kernel, is over)
    def mark(grad):
        torch.empty(MARKER, dtype=torch.uint8)

    def hook(module, args):
        args[0].register_hook(mark)
    model.norm.register_forward_pre_hook(hook)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:]).float().mean()
        loss.backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # stable: events of one nanosecond stay in recorded order
    return [e.nbytes() for e in events]


@pytest.fixture(scope="module")
def events():
    names = list(CASES) + list(MIXERS)
    cases = [CASES[n][:2] for n in CASES] + [MIXERS[n][:5] for n in MIXERS]
    return dict(zip(names, run_distributed(_run, 1, cases)[0]))


def test_residual_sized_tensors_of_an_offloaded_block_backward(events):
    """`[T, D]` tensors at the peak of the second block's backward: the gradient it was called with, the stream's
    gradient inside the block, the float32 gradient of the head groups' sum (residual_grads); its input brought
    back and the first block's on its way; its recomputed output, held as the root of its gradients, and the
    head groups' input gradient (recompute_extras); on CPU the first block's input still in the stash too."""
    m, res = _cfg(), 2
    extras = recompute_extras(m, "L", MEMORY, False, 1, 2, T)
    counted = (residual_grads(m, MEMORY, False, T) + 2 * res * D * T + extras["offloaded output (held)"]
               + extras["head groups: input gradient"])
    assert counted == (2 + 2 + 4 + 2 + 2 + 2 + 2) * D * T  # by hand: bf16 but the float32 gradient of the sum
    assert _peak(events["blocks"], (2 * D * T, 4 * D * T)) == counted + res * D * T


def test_one_head_groups_tensors_with_the_previous_groups_gradients(events):
    """One group's `[T, h, d]` tensors at the peak of a mixer's backward: q, k, v, the output and their gradients
    (the mixer's transient), and, from the second group on, the previous group's dq, dk, dv still referenced."""
    one = 2 * T * IG
    previous = recompute_extras(_cfg(), "L", MEMORY, False, 1, 2, T)["head groups: previous group's gradients"]
    assert previous == 3 * one
    assert _peak(events["blocks"], (one,)) == 8 * one + previous


@pytest.mark.parametrize("case", list(CASES))
def test_an_offloaded_backward_holds_what_the_estimator_counts(events, case):
    """Whole blocks or each stage offloaded, with head groups, a bf16 or float32 stream: the peak of the `[T, D]`
    and one group's `[T, h, d]` tensors in the second block's backward is the estimator's block transient,
    residual gradients and recompute parts, less what the transient counts of one tile (tile-sized tensors are
    not followed here), plus the stash's inputs on CPU (a stage's backward holds no gradient of a whole block's
    output)."""
    memory, residual, stashed = CASES[case]
    m = _cfg(residual)

    def counted(n):  # the second block's backward (offloaded blocks hold nothing between their passes)
        return (_block(m, "L", memory, False, 1, 2, n)[1] + residual_grads(m, memory, False, n)
                + sum(recompute_extras(m, "L", memory, False, 1, 2, n).values()))
    per_tile = 2 * counted(T) - counted(2 * T)  # the only part that does not grow with the tokens
    assert 0 < per_tile < 2 * D * T
    stash = stashed * m.residual_bytes * D * T
    assert _peak(events[case], (D * T, 2 * D * T, 4 * D * T)) == counted(T) - per_tile + stash


@pytest.mark.parametrize("case", list(MIXERS))
def test_an_offloaded_mixer_backward_holds_what_the_estimator_counts(events, case):
    """Linear and softmax blocks, offloaded whole or stage by stage, tiled, without head groups (and softmax ones
    with them): the peak of the `[T, D]` tensors and the attention's bf16 `[T, 64]` or `[T, 128]` ones over the
    whole backward is the estimator's block transient, residual gradients and recompute parts (less the parts of
    one tile, and the float32 log-sum-exp the elementwise attention does not make), plus the stash's inputs on
    CPU. Without head groups a linear block's peak is at its attention's backward: q, k, v, the output's
    gradient, dq, dk, dv, beside two residual gradients (the block's, the stream's inside it), not three."""
    memory, residual, pattern, kv_heads, head_dim, stashed = MIXERS[case]
    m = _cfg(residual, pattern, kv_heads, head_dim)

    def counted(n):
        return (_block(m, pattern, memory, False, 1, 2, n)[1] + residual_grads(m, memory, False, n)
                + sum(recompute_extras(m, pattern, memory, False, 1, 2, n).values()))
    per_tile = 2 * counted(T) - counted(2 * T)
    assert 0 < per_tile < 4 * D * T  # a tile's parts (the MLP's, where its backward peaks), under a [T, D]
    lse = 4 * HEADS // max(memory.head_groups, 1) * T if pattern == "N" else 0
    stash = stashed * m.residual_bytes * D * T
    assert _peak(events[case], (D * T, 2 * D * T, 4 * D * T)) == counted(T) - per_tile - lse + stash


def test_an_ungrouped_linear_block_by_hand(events):
    """The 1M config's options without head groups, bf16: the second block's backward at its attention holds q,
    k, v, the output's gradient, dq, dk, dv (the output itself freed by the output tiles' backward); its input
    brought back, the first's on its way; the gradient it was called with and the stream's inside it; its
    recomputed output (all bf16 [T, D] here) and, on CPU, the first block's input in the stash."""
    m, one = _cfg(), 2 * D * T
    counted = (_block(m, "L", BLOCKS, False, 1, 2, T)[1] + residual_grads(m, BLOCKS, False, T)
               + sum(recompute_extras(m, "L", BLOCKS, False, 1, 2, T).values()))
    per_tile = counted - (7 + 2 + 2 + 1) * one
    assert residual_grads(m, BLOCKS, False, T) == 2 * one
    assert 0 < per_tile < one
    assert _peak(events["linear"], (one, 2 * one)) == counted - per_tile + one


CONFIG_1M = os.path.join(REPO, "configs", "hybrid_1b_1m.yaml")
CONFIG_1B = os.path.join(REPO, "configs", "hybrid_1b_gpu.yaml")


def test_the_1m_config_by_hand():
    """configs/hybrid_1b_1m.yaml (blocks offloaded, bf16 stream, 4 head groups) at 1,048,576 tokens: 4 GiB a bf16
    [T, 2048]. Its first block's backward holds, beyond the mixer's transient, the residual gradients (two bf16,
    one float32: 16 GiB), the recomputed block output (4 GiB), the head groups' input gradient (4 GiB) and the
    previous group's dq, dk, dv (4 heads of 128, bf16: 3 GiB). One H100 step measured 60.56 GiB max allocated."""
    est = estimate_config(validate(load_config(CONFIG_1M), 1), 1, reserve=0)
    p = est.parts
    assert est.moment == "block 0 backward"
    assert p["residual gradients"] == 16 * GiB
    assert p["offloaded output (held)"] == 4 * GiB and p["head groups: input gradient"] == 4 * GiB
    assert p["head groups: previous group's gradients"] == 3 * GiB
    assert 60.5 * GiB < est.peak < 60.8 * GiB


def test_the_1m_config_without_head_groups_by_hand():
    """configs/hybrid_1b_1m.yaml with memory.mixer_head_groups=0 at 1,048,576 tokens: its first (linear) block's
    backward holds at its attention's backward q, k, v, the output's gradient, dq, dk, dv (7 bf16 [T, 16 × 128]:
    28 GiB), its input brought back and the next one's (8 GiB), one tile's parts, two residual gradients (8 GiB)
    and its recomputed output (4 GiB): 65.8 GiB, 72.4 with the capacity check's 10% (an 80 GB GPU takes it)."""
    cfg = validate(load_config(CONFIG_1M, ["memory.mixer_head_groups=0"]), 1)
    est = estimate_config(cfg, 1, reserve=0)
    p = est.parts
    assert est.moment == "block 0 backward"
    assert p["residual gradients"] == 8 * GiB and p["offloaded output (held)"] == 4 * GiB
    assert not [k for k in p if k.startswith("head groups")]
    assert 36 * GiB < p["block backward (transient)"] < 36.3 * GiB
    assert 65.7 * GiB < est.peak < 65.9 * GiB
    assert estimate_config(cfg, 1).peak < 79.1 * GiB


def test_per_stage_offload_in_float32_by_hand():
    """Every stage offloaded, float32 stream, 4 head groups: the mixer stage's backward holds the gradient it was
    called with, which is also the float32 gradient of the groups' sum (8 GiB), its recomputed output (8 GiB)
    and the head groups' input gradient (8 GiB); no stream gradient inside a block (the MLP is its own stage)."""
    est = estimate_config(validate(load_config(CONFIG_1M, PER_STAGE_1M), 1), 1, reserve=0)
    p = est.parts
    assert p["residual gradients"] == 8 * GiB
    assert p["offloaded output (held)"] == 8 * GiB and p["head groups: input gradient"] == 8 * GiB
    assert p["head groups: previous group's gradients"] == 3 * GiB


@pytest.mark.parametrize("variant, gate, gate_tp2", [("lightning", 0, 0), ("simple_gla", 4 * 2, 4 * 1),
                                                     ("gla", 4 * 64, 4 * 32)])
def test_previous_groups_gradients_by_kind(variant, gate, gate_tp2):
    """q, k, v gradients of one group (and the gate's, float32: per head or per key) for linear mixers; q, k, v of
    one group of KV heads with its query heads for softmax mixers. 8 heads of 32 (4 KV heads), 4 groups, bf16;
    at TP 2 a group is one head."""
    m = ModelConfig(dim=256, n_layers=4, pattern="LLLN", n_heads=8, n_kv_heads=4, linear_variant=variant,
                    vocab_size=1000)
    mem, N, key = MemoryOptions(blocks="offload", mixer_head_groups=4, mixer_tile=64), 1024, \
        "head groups: previous group's gradients"
    assert recompute_extras(m, "L", mem, False, 1, 2, N)[key] == (3 * 2 * 64 + gate) * N
    assert recompute_extras(m, "N", mem, False, 1, 2, N)[key] == 2 * (64 + 2 * 32) * N
    assert recompute_extras(m, "L", mem, False, 2, 2, N)[key] == (3 * 2 * 32 + gate_tp2) * N


def test_what_is_not_offloaded_or_grouped_is_unchanged():
    """Nothing offloaded, nothing tiled, no head groups: no new parts, three [T, D] of residual gradients; checkpointed
    stages with head groups keep no recomputed output, and their residual gradients are the mixer output's and
    the float32 sum's. The block-checkpointing points of docs/benchmarks.md keep their predictions."""
    m = ModelConfig(dim=256, n_layers=4, pattern="LLLN", n_heads=8, n_kv_heads=4, vocab_size=1000,
                    residual_dtype="bfloat16")
    N, D = 1024, 256
    plain = MemoryOptions()
    assert recompute_extras(m, "L", plain, True, 1, 2, N) == {} and residual_grads(m, plain, True, N) == 3 * 2 * D * N
    ck = MemoryOptions("checkpoint", "checkpoint", "checkpoint", mixer_head_groups=2)
    assert set(recompute_extras(m, "L", ck, False, 1, 2, N)) == {"head groups: input gradient",
                                                                   "head groups: previous group's gradients"}
    assert residual_grads(m, ck, False, N) == (2 + 4) * D * N
    for T, gib in ((16384, 20.86), (32768, 23.56), (65536, 30.70)):
        c = load_config(CONFIG_1B, ["parallel.sp=1", f"data.seq_len={T}", "schedule.activation_checkpointing=true"])
        est = estimate(c.model, Layout(seq_len=T), c.memory.options(), whole_block_checkpointing=True)
        assert round(est.peak / GiB, 2) == gib
