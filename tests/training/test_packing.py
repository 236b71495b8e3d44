"""Packed documents in training: the maps of packing.py, the config rule for linear layers, the model (softmax
only, and a hybrid with linear layers) against each document alone, forward and gradient, and one training step
with SP = 2 (zigzag; ring, ZeCO) against DP = 2 (the one-device gradient), in one 2-process spawn."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from harness import rel_err, run_distributed
from longscan.distributed.documents import global_positions
from longscan.training.config import ConfigError, load_config, validate
from longscan.training.data import PackedData, write_token_file
from longscan.training.packing import DocumentPackedData, row_cu_seqlens
from training_common import EOS, assemble, local_tensors, stream, tiny


@pytest.mark.parametrize("layout,world,rank", [("contiguous", 1, 0), ("zigzag", 2, 1), ("zigzag", 4, 2)])
def test_rows_brute_force(layout, world, rank):
    docs = stream()
    toks = np.concatenate([np.append(d, EOS) for d in docs])
    L = 32
    pos = global_positions(L // world, world, rank, layout).numpy()
    data = DocumentPackedData(PackedData(toks, L, 0.1, 0, pos), EOS)
    mb = data.rows([3, 5])
    for b, s in enumerate((3, 5)):
        row = toks[s * L:(s + 1) * L]
        # brute force: a new document starts after every EOS inside the row
        start, doc_pos, starts = 0, [], [0]
        for i in range(L):
            doc_pos.append(i - start)
            if row[i] == EOS and i + 1 < L:
                start = i + 1
                starts.append(start)
        assert mb.cu_seqlens[b].tolist() == starts + [L]
        assert mb.positions[b].tolist() == [doc_pos[p] for p in pos]
        assert mb.loss_mask[b].tolist() == [0.0 if row[p] == EOS else 1.0 for p in pos]
        assert mb.labels[b].tolist() == [int(toks[s * L + p + 1]) for p in pos]
    assert row_cu_seqlens(np.array([1, EOS, 2, EOS]), EOS).tolist() == [0, 2, 4]


def test_packing_with_linear_layers_needs_an_exact_backend(monkeypatch):
    """Over an SP group, linear layers take packed documents on the torch, naive and triton backends (and auto,
    which picks one of them); fla is refused there, naming the keys, and taken at SP 1 (as batch rows). The
    delta-rule variants are refused."""
    def cfg(model=None, **parallel):
        return load_config(None, tiny(data={"pack_documents": True}, parallel=parallel, model=model or {}))
    for backend in ("torch", "naive", "auto", "triton", "fla"):
        validate(cfg(linear_backend=backend), 1)
    for backend in ("torch", "naive", "auto", "triton"):
        validate(cfg(linear_backend=backend, sp=2), 2)
    with pytest.raises(ConfigError, match="data.pack_documents.*parallel.sp = 2 needs parallel.linear_backend "
                                          "= auto, torch, naive or triton, got 'fla'"):
        validate(cfg(linear_backend="fla", sp=2), 2)
    with pytest.raises(ConfigError, match="data.pack_documents.*model.linear_variant = 'gated_deltanet'"):
        validate(cfg(model={"linear_variant": "gated_deltanet"}, linear_backend="torch"), 1)
    validate(cfg(model={"linear_variant": "gated_deltanet", "pattern": "NNNN"}), 1)   # no linear layers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(cfg(sp=2), 2)   # auto: the Triton kernels on a CUDA machine
    validate(cfg(), 1)
    validate(cfg(linear_backend="torch", sp=2), 2)


# the softmax-only model, and a hybrid whose linear layers have a learned per-token gate (resets into g)
MODELS = {"NN": {"pattern": "NN", "n_layers": 2}, "LLLN": {"pattern": "LLLN", "n_layers": 4,
                                                         "linear_variant": "simple_gla"}}


def _cfg(path, model, **parallel):
    return tiny(model=MODELS[model],
                parallel={"layout": "contiguous", **parallel},
                data={"source": "tokens", "path": path, "pack_documents": True, "seq_len": 64})


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.detach().clone() for g in torch.autograd.grad(loss, params)]


def _dp2(path, model):
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, _cfg(path, model)))
    mb = t.data.train_microbatches(0, 4, 1, t.ranks.dp_rank, 2)[0]
    spans = list(zip(mb.cu_seqlens[0][:-1].tolist(), mb.cu_seqlens[0][1:].tolist()))
    t.model.eval()
    with torch.no_grad():
        packed = t.model(mb.tokens, mb.labels, mb.cu_seqlens, mb.positions, mb.loss_mask)
        alone = torch.cat([t.model(mb.tokens[:, a:b], mb.labels[:, a:b]) for a, b in spans], 1)
        unpacked = t.model(mb.tokens, mb.labels)
    # the gradient of the packed loss against the sum of the documents' losses, each document alone
    g_packed = _grads(t.model, t.model(mb.tokens, mb.labels, mb.cu_seqlens, mb.positions, mb.loss_mask).sum())
    g_alone = _grads(t.model, sum((t.model(mb.tokens[:, a:b], mb.labels[:, a:b]) * mb.loss_mask[:, a:b]).sum()
                                  for a, b in spans))
    # memory.mixer_tile: the mixers' projections and norms run 24 tokens at a time, the attention on them whole
    untiled = [layer.memory for layer in t.model.layers.values()]
    for layer in t.model.layers.values():
        layer.memory = dataclasses.replace(layer.memory, mixer_tile=24)
    tiled = t.model(mb.tokens, mb.labels, mb.cu_seqlens, mb.positions, mb.loss_mask)
    g_tiled = _grads(t.model, tiled.sum())
    for layer, mem in zip(t.model.layers.values(), untiled):
        layer.memory = mem
    t.model.train()
    m = t.train_step()
    return {"packed": packed * mb.loss_mask, "alone": alone * mb.loss_mask, "unpacked": unpacked * mb.loss_mask,
            "grad_err": max(rel_err(a, b) for a, b in zip(g_packed, g_alone)), "tiled": tiled.detach(),
            "tiled_grad_err": max(rel_err(a, b) for a, b in zip(g_tiled, g_packed)),
            "n_docs": len(mb.cu_seqlens[0]) - 1, "loss": m["loss"], **local_tensors(t)}


def _sp2(path, model):
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, _cfg(path, model, sp=2, layout="zigzag", softmax_method="ring")))
    return {"loss": t.train_step()["loss"], **local_tensors(t)}


def _worker(rank, world, path):
    return {m: (_dp2(path, m), _sp2(path, m)) for m in MODELS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("packed") / "docs.u16")
    write_token_file(path, stream(seed=1, n_docs=400), 257, EOS)
    return run_distributed(_worker, 2, path)


@pytest.fixture(scope="module", params=list(MODELS))
def results(request, runs):
    return [r[request.param][0] for r in runs], [r[request.param][1] for r in runs]


def test_model_attends_within_documents(results):
    for one in results[0]:
        assert one["n_docs"] > 3
        assert rel_err(one["packed"], one["alone"]) <= 1e-5
        assert rel_err(one["unpacked"], one["alone"]) > 1e-3      # without documents the losses differ
        assert one["grad_err"] <= 1e-5
        assert rel_err(one["tiled"], one["packed"]) <= 1e-5 and one["tiled_grad_err"] <= 1e-5


def test_sp2_ring_step_matches_one_device(results):
    dp2, sp2 = results
    assert abs(sp2[0]["loss"] - dp2[0]["loss"]) <= 1e-5 * abs(dp2[0]["loss"])
    _, g_one = assemble(dp2)
    _, g_sp = assemble(sp2)
    for name in g_one:
        assert rel_err(g_sp[name], g_one[name]) <= 1e-5, name
