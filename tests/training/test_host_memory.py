"""Host memory of offloaded activations: the estimate against what the stash holds, the capacity check's
refusal before start, and the error of a failed host allocation.

One spawn of two gloo processes builds the model at TP 2 and TP 1 with offloaded stages, runs one forward
(float32 and CPU bf16 autocast) and measures the bytes its stash holds; the estimator must give the same.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness import each_tp, run_distributed, tp_model
from longscan.models.args import MemoryOptions, ModelConfig
from longscan.training.config import ConfigError, load_config, validate
from longscan.training.memory import (GiB, Layout, check_capacity, estimate, estimate_config, host_available_bytes,
                                      offloaded_host_bytes, pinned_block_bytes)
from longscan.training.offload import HostMemoryError, HostStash, offloaded_checkpoint, stashes_in_graph
from training_common import PER_STAGE_1M

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_1M = os.path.join(REPO, "configs", "hybrid_1b_1m.yaml")
T = 48
CASES = {  # name -> (memory options, micro-batch size)
    "all offloaded, grouped and tiled": (MemoryOptions("offload", "offload", "offload", mixer_tile=16,
                                                       mixer_head_groups=2, mlp_tile=16), 1),
    "linear mixers only": (MemoryOptions("offload", "checkpoint", "none"), 2),
    "softmax mixers and MLPs": (MemoryOptions("checkpoint", "offload", "offload"), 1),
}


def _cfg():
    return ModelConfig(dim=32, n_layers=4, pattern="LLLN", n_heads=8, n_kv_heads=4, linear_variant="lightning",
                       vocab_size=100)


def _measure(rank, world):
    from longscan.models.model import SPSpec
    cfg, out = _cfg(), {}
    torch.manual_seed(0)
    for tp in each_tp():
        for name, (memory, batch) in CASES.items():
            model = tp_model(cfg, SPSpec(linear_backend="torch"), tp, memory=memory)
            for bf16 in (False, True):
                tokens = torch.randint(0, cfg.vocab_size, (batch, T))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(tokens, tokens).float().sum()
                stashes = stashes_in_graph(loss)
                # what a CPU stash holds: plain host copies of the stage inputs
                held = sum(e.host.numel() * e.host.element_size() for s in stashes for e in s.entries)
                if not bf16:  # (megatron's layers take no CPU bf16 backward)
                    loss.backward()
                left = None if bf16 else sum(s.held_bytes for s in stashes)
                out[(tp, name, bf16)] = (len(stashes), held, left)
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure, 2)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_host_estimate_equals_what_the_stash_holds(measured, case, tp, bf16):
    memory, batch = CASES[case]
    predicted = estimate(_cfg(), Layout(tp=tp, seq_len=T, micro_batch_size=batch), memory, bf16=bf16,
                         pinned=False)
    for res in measured:
        n_stashes, held, after_backward = res[(tp, case, bf16)]
        assert n_stashes == 1  # one stash per forward
        assert held == predicted.host_bytes > 0
        assert bf16 or after_backward == 0  # the backward took every input back


def test_host_estimate_by_stage_kind_and_schedule():
    """Hand count: each offloaded stage holds its float32 [tokens, dim] input; 1F1B's first stage holds
    min(pp, microbatches) forwards; pinned blocks are rounded up to a power of two."""
    m = ModelConfig(dim=48, n_layers=8, pattern="LLLN", n_heads=4, n_kv_heads=2, vocab_size=100)
    one = 4 * 48 * 1000
    mem = MemoryOptions("offload", "checkpoint", "offload")
    host = offloaded_host_bytes(m, Layout(seq_len=1000), mem, pinned=False)
    assert host == {"linear mixers": 6 * one, "MLPs": 8 * one}
    assert pinned_block_bytes(one) == 262144 > one and pinned_block_bytes(1 << 20) == 1 << 20
    assert offloaded_host_bytes(m, Layout(seq_len=1000), mem) == {"linear mixers": 6 * 262144, "MLPs": 8 * 262144}
    # pp 2 with 4 microbatches: 4 blocks (3 L, 1 N) on the first stage, two forwards in flight; sp 2 halves it
    assert offloaded_host_bytes(m, Layout(pp=2, microbatches=4, seq_len=2000, sp=2), mem, pinned=False) == \
        {"linear mixers": 2 * 3 * one, "MLPs": 2 * 4 * one}
    assert offloaded_host_bytes(m, Layout(seq_len=1000), MemoryOptions("checkpoint", "none", "none")) == {}
    est = estimate(m, Layout(seq_len=1000), mem)
    assert est.host_bytes == 14 * 262144
    table = est.table()
    assert "| host: offloaded inputs of the MLPs |" in table and "**host (pinned, per process)**" in table
    assert "host" not in estimate(m, Layout(seq_len=1000), MemoryOptions()).table()


def test_the_1m_config_needs_320_gib_of_host_memory():
    """configs/hybrid_1b_1m.yaml offloading every stage in float32: 40 offloaded stages (a mixer and an MLP in
    each of 20 blocks), each a float32 [1,048,576, 2048] input of 8 GiB (docs/memory.md); SP 4 holds a quarter of
    it a process."""
    cfg = validate(load_config(CONFIG_1M, PER_STAGE_1M), 1)
    est = estimate_config(cfg, 1)
    assert est.host == {"linear mixers": 15 * 8 * GiB, "softmax mixers": 5 * 8 * GiB, "MLPs": 20 * 8 * GiB}
    assert est.host_bytes == 320 * GiB
    sp4 = validate(load_config(CONFIG_1M, PER_STAGE_1M + ["parallel.sp=4"]), 4)
    assert estimate_config(sp4, 4).host_bytes == 80 * GiB


def test_capacity_check_refuses_a_host_too_small():
    cfg = validate(load_config(CONFIG_1M, PER_STAGE_1M), 1)
    with pytest.raises(ConfigError) as e:
        check_capacity(cfg, 1, capacity_bytes=80 * GiB, host_bytes=128 * GiB, procs_per_node=1)
    msg = str(e.value)
    assert "memory.linear_layers / softmax_layers / mlp" in msg and "checkpoint" in msg
    assert "320.0 GiB per process" in msg and "available 128.0 GiB" in msg
    assert "parallel.sp >= 4" in msg and "memory.check_capacity=false" in msg
    assert check_capacity(cfg, 1, capacity_bytes=80 * GiB, host_bytes=330 * GiB, procs_per_node=1) is not None
    with pytest.raises(ConfigError, match=r"shared by 2 process\(es\) on this node \(165.0 GiB each\)"):
        check_capacity(cfg, 1, capacity_bytes=80 * GiB, host_bytes=330 * GiB, procs_per_node=2)
    off = validate(load_config(CONFIG_1M, PER_STAGE_1M + ["memory.check_capacity=false"]), 1)
    assert check_capacity(off, 1, capacity_bytes=80 * GiB, host_bytes=1 * GiB, procs_per_node=1) is None
    kept = validate(load_config(CONFIG_1M, PER_STAGE_1M + ["memory.linear_layers=checkpoint",
                                                           "memory.softmax_layers=checkpoint", "memory.mlp=checkpoint",
                                                           "data.seq_len=65536"]), 1)
    assert check_capacity(kept, 1, capacity_bytes=80 * GiB, host_bytes=1, procs_per_node=1) is not None  # no offload


def test_capacity_check_names_the_stage_kinds_that_fit_both():
    """At 256K tokens on a 64 GiB host: checkpointing the MLPs (or the linear mixers) fits the host and the GPU;
    the run it suggests passes the check."""
    cfg = validate(load_config(CONFIG_1M, PER_STAGE_1M + ["data.seq_len=262144"]), 1)
    with pytest.raises(ConfigError) as e:
        check_capacity(cfg, 1, capacity_bytes=80 * GiB, host_bytes=64 * GiB, procs_per_node=1)
    msg = str(e.value)
    assert "80.0 GiB per process" in msg and "memory.mlp=checkpoint" in msg
    assert "memory.softmax_layers=checkpoint (" not in msg  # 70 GiB: still too much
    fixed = validate(load_config(CONFIG_1M, PER_STAGE_1M + ["data.seq_len=262144", "memory.mlp=checkpoint"]), 1)
    assert check_capacity(fixed, 1, capacity_bytes=80 * GiB, host_bytes=64 * GiB, procs_per_node=1) is not None


def test_host_available_bytes_reads_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   100663296 kB\n")
    assert host_available_bytes(str(f)) == 96 * GiB
    fallback = host_available_bytes(str(tmp_path / "missing"))  # os.sysconf's free pages
    assert fallback is None or fallback > 0


def test_a_failed_host_allocation_says_what_and_how_much():
    calls = []

    def allocate(shape, dtype):
        calls.append((tuple(shape), dtype))
        if len(calls) == 3:
            raise RuntimeError("CUDA error: out of memory")
        return torch.empty(shape, dtype=dtype)
    stash = HostStash(torch.device("cpu"), allocate=allocate)
    a, b = torch.randn(4, 8), torch.randn(2, 8)
    stash.put(a), stash.put(b)
    assert stash.held_bytes == (32 + 16) * 4 and torch.equal(stash.entries[0].host, a)
    with pytest.raises(RuntimeError) as e:
        stash.put(torch.randn(5, 8, dtype=torch.float64))
    assert isinstance(e.value, HostMemoryError) and calls[-1] == ((5, 8), torch.float64)
    msg = str(e.value)
    assert "host memory for offloaded activations" in msg
    assert "(320 bytes) asked" in msg and "(192 bytes) already held" in msg and "2 offloaded input" in msg
    assert "memory.linear_layers / softmax_layers / mlp" in msg and "checkpoint" in msg and "parallel.sp" in msg
    assert isinstance(e.value.__cause__, RuntimeError) and "CUDA error" in str(e.value.__cause__)
    assert len(stash.entries) == 2  # nothing half-added


def test_offload_through_an_allocator_is_exact():
    """The stash's host buffers come from its allocator; the stage's gradients are unchanged."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    made = []

    def allocate(shape, dtype):
        made.append(torch.empty(shape, dtype=dtype))
        return made[-1]

    def grads(stash):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        f = lambda t: torch.tanh(t @ ws) + t  # noqa: E731
        y = offloaded_checkpoint(f, xs, [ws], stash) if stash else f(xs)
        y.pow(2).sum().backward()
        return xs.grad, ws.grad
    got, ref = grads(HostStash(x.device, allocate=allocate)), grads(None)
    assert len(made) == 1 and made[0].shape == x.shape
    for p, q in zip(got, ref):
        assert torch.allclose(p, q, rtol=1e-12, atol=0)
