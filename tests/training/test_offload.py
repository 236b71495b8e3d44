"""Activation checkpointing with host offload, and every memory option of the model, change no result.

Unit: ``offloaded_checkpoint`` against the plain function (float64, forward and backward), what it keeps in
the autograd graph (its input only on the host: no saved activations), and the prefetch of the stage before.
Model: one optimizer step with memory options (per-kind checkpoint/offload, tiled MLP, chunked loss) against
the same step without them: one process, TP 2, SP 2 and PP 2 (float32, relative L2 ≤ 1e-5).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import rel_err, run_distributed
from longscan.training.offload import HostStash, offloaded_checkpoint
from training_common import assemble, local_tensors, tiny

TOL = 1e-5


def _net(w1, w2):
    return lambda x: torch.tanh(x @ w1) @ w2 + x


def test_offloaded_checkpoint_matches_plain():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    w1, w2 = (torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    gy = torch.randn(3, 8, generator=g, dtype=torch.float64)

    def run(offload):
        xs, a, b = (t.clone().requires_grad_() for t in (x, w1, w2))
        stash = HostStash(x.device)
        h = xs * 2
        for _ in range(3):  # three stages in a row, each taking the one before from the stash
            h = offloaded_checkpoint(_net(a, b), h, [a, b], stash) if offload else _net(a, b)(h)
        h.backward(gy)
        return [h.detach(), xs.grad, a.grad, b.grad]
    for p, q in zip(run(True), run(False)):
        assert rel_err(p, q) < 1e-14


def test_offload_keeps_no_activations_and_prefetches_the_stage_before():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    stash = HostStash(x.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h0 = offloaded_checkpoint(_net(w, w), x, [w], stash)
        h1 = offloaded_checkpoint(_net(w, w), h0, [w], stash)
    assert all(t is w for t in saved)  # the graph keeps the weight, no activation
    assert all(e.host.data_ptr() != t.data_ptr() for e, t in zip(stash.entries, (x, h0)))  # copies, not aliases
    assert torch.equal(stash.entries[1].host, h0.detach())
    h1.sum().backward()
    assert stash.entries == [None, None]  # each taken once, by its own backward
    plain = _net(w.detach(), w.detach())
    ref = x.detach().clone().requires_grad_()
    plain(plain(ref)).sum().backward()
    assert rel_err(x.grad, ref.grad) < 1e-6


def test_prefetch_brings_back_the_stage_before():
    stash = HostStash(torch.device("cpu"))
    a, b = torch.randn(3), torch.randn(3)
    stash.put(a), stash.put(b)
    assert torch.equal(stash.take(1), b)
    stash.prefetch(0)
    assert stash.entries[0].value is not None and torch.equal(stash.take(0), a)


OPTIONS = {
    "offload_all_tiled_chunked": {"linear_layers": "offload", "softmax_layers": "offload", "mlp": "offload",
                                  "mlp_tile": 24, "loss_chunk": 40, "mixer_tile": 12},
    "checkpoint_all": {"linear_layers": "checkpoint", "softmax_layers": "checkpoint", "mlp": "checkpoint"},
    "mixed": {"linear_layers": "offload", "softmax_layers": "checkpoint", "mlp_tile": 16, "loss_chunk": 7},
    "offload_blocks_tiled_chunked": {"blocks": "offload", "mlp_tile": 24, "loss_chunk": 40, "mixer_tile": 12},
}
SPLITS = {"tp2": {"tp": 2}, "sp2": {"sp": 2}, "pp2": {"pp": 2}}  # pp2: 1F1B holds two microbatches


def _one_step(cfg_dict):
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, cfg_dict))
    m = t.train_step()
    return {"loss": m["loss"], "grad_norm": m["grad_norm"], "val": t.evaluate(), **local_tensors(t),
            "memory": dataclasses.asdict(t.model.memory)}


def _single(rank, world):
    out = {"ref": _one_step(tiny())}
    out.update({n: _one_step(tiny(memory=o)) for n, o in OPTIONS.items()})
    return out


def _split(rank, world):
    out = {s: _one_step(tiny(parallel=p, memory=OPTIONS["offload_all_tiled_chunked"])) for s, p in SPLITS.items()}
    out["sp2 blocks"] = _one_step(tiny(parallel={"sp": 2}, memory=OPTIONS["offload_blocks_tiled_chunked"]))
    return out


@pytest.fixture(scope="module")
def steps():
    single = run_distributed(_single, 1)[0]
    split = run_distributed(_split, 2)
    return single, {s: [r[s] for r in split] for s in (*SPLITS, "sp2 blocks")}


def _same(ranks, ref):
    for r in ranks:
        assert abs(r["loss"] - ref["loss"]) <= TOL * ref["loss"]
        assert abs(r["grad_norm"] - ref["grad_norm"]) <= TOL * ref["grad_norm"]
        assert abs(r["val"] - ref["val"]) <= TOL * ref["val"]
    params, grads = assemble(ranks)
    ref_params, ref_grads = assemble([ref])
    assert params.keys() == ref_params.keys()
    for name in ref_params:
        assert rel_err(grads[name], ref_grads[name]) <= TOL, name
        assert rel_err(params[name], ref_params[name]) <= TOL, name


@pytest.mark.parametrize("options", list(OPTIONS))
def test_memory_options_change_nothing(steps, options):
    single, _ = steps
    assert {k: single[options]["memory"][k] for k in OPTIONS[options]} == OPTIONS[options]  # the model got them
    _same([single[options]], single["ref"])


@pytest.mark.parametrize("split", list(SPLITS))
def test_memory_options_under_tp_and_sp(steps, split):
    single, split_steps = steps
    _same(split_steps[split], single["ref"])


def test_offload_under_bf16_autocast_is_bitwise():
    """The recomputation runs under the forward's autocast, so it gives the plain bf16 step's gradients."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, generator=g)
    w1, w2 = (torch.randn(16, 16, generator=g) / 4 for _ in range(2))

    def run(offload):
        xs, a, b = (t.clone().requires_grad_() for t in (x, w1, w2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = _net(a, b)
            y = offloaded_checkpoint(f, xs, [a, b], HostStash(x.device)) if offload else f(xs)
        y.float().sum().backward()
        return [y, xs.grad, a.grad, b.grad]
    for p, q in zip(run(True), run(False)):
        assert p.dtype == q.dtype and torch.equal(p, q)


def test_blocks_offloaded_under_sp(steps):
    """Whole blocks offloaded and recomputed over an SP group of 2 (the SP collectives run again in the
    recomputation)."""
    single, split_steps = steps
    _same(split_steps["sp2 blocks"], single["ref"])
