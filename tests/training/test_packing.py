"""Packed documents in training: the maps of packing.py, the model against each document alone, and one
training step with SP = 2 (ring, zigzag) against DP = 2 (the one-device gradient), in one 2-process spawn."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness import rel_err, run_distributed
from longscan.distributed.documents import global_positions
from longscan.training.config import ConfigError, load_config, validate
from longscan.training.data import PackedData, write_token_file
from longscan.training.packing import DocumentPackedData, row_cu_seqlens
from training_common import assemble, local_tensors, tiny

EOS = 256


def stream(seed=0, n_docs=300):
    gen = np.random.default_rng(seed)
    return [gen.integers(0, 256, int(gen.integers(1, 24))) for _ in range(n_docs)]


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


def test_linear_layers_refuse_packing():
    cfg = load_config(None, tiny(data={"pack_documents": True}))
    with pytest.raises(ConfigError, match="data.pack_documents"):
        validate(cfg, 1)


def _cfg(path, **parallel):
    return tiny(model={"pattern": "NN", "n_layers": 2},
                parallel={"layout": "contiguous", **parallel},
                data={"source": "tokens", "path": path, "pack_documents": True, "seq_len": 64})


def _dp2(path):
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, _cfg(path)))
    mb = t.data.train_microbatches(0, 4, 1, t.ranks.dp_rank, 2)[0]
    t.model.eval()
    with torch.no_grad():
        packed = t.model(mb.tokens, mb.labels, mb.cu_seqlens, mb.positions, mb.loss_mask)
        alone = torch.cat([t.model(mb.tokens[:, a:b], mb.labels[:, a:b])
                           for a, b in zip(mb.cu_seqlens[0][:-1].tolist(), mb.cu_seqlens[0][1:].tolist())], 1)
        unpacked = t.model(mb.tokens, mb.labels)
    t.model.train()
    m = t.train_step()
    return {"packed": packed * mb.loss_mask, "alone": alone * mb.loss_mask, "unpacked": unpacked * mb.loss_mask,
            "n_docs": len(mb.cu_seqlens[0]) - 1, "loss": m["loss"], **local_tensors(t)}


def _sp2(path):
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, _cfg(path, sp=2, layout="zigzag", softmax_method="ring")))
    return {"loss": t.train_step()["loss"], **local_tensors(t)}


def _worker(rank, world, path):
    return _dp2(path), _sp2(path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("packed") / "docs.u16")
    write_token_file(path, stream(seed=1, n_docs=400), 257, EOS)
    per_rank = run_distributed(_worker, 2, path)
    return [r[0] for r in per_rank], [r[1] for r in per_rank]


def test_model_attends_within_documents(results):
    for one in results[0]:
        assert one["n_docs"] > 3
        assert rel_err(one["packed"], one["alone"]) <= 1e-5
        assert rel_err(one["unpacked"], one["alone"]) > 1e-3      # without documents the losses differ


def test_sp2_ring_step_matches_one_device(results):
    dp2, sp2 = results
    assert abs(sp2[0]["loss"] - dp2[0]["loss"]) <= 1e-5 * abs(dp2[0]["loss"])
    _, g_one = assemble(dp2)
    _, g_sp = assemble(sp2)
    for name in g_one:
        assert rel_err(g_sp[name], g_one[name]) <= 1e-5, name
