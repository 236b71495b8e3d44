"""data.balance_documents: each packed sequence's documents in the balanced order. The rows against brute force,
the config rules, and in one 2-process spawn: the model's loss and gradients on a reordered microbatch against
the given order (one process, float64 parameters), and an SP = 2 training step with and without balancing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness import rel_err, run_distributed
from longscan.distributed.balance import balanced_order
from longscan.distributed.documents import global_positions
from longscan.training.config import ConfigError, load_config, validate
from longscan.training.data import PackedData, write_token_file
from longscan.training.packing import DocumentBalance, DocumentPackedData
from training_common import EOS, assemble, local_tensors, stream, tiny


@pytest.mark.parametrize("layout,world,rank", [("zigzag", 2, 1), ("zigzag", 4, 2), ("contiguous", 4, 3)])
def test_balanced_rows_brute_force(layout, world, rank):
    """Every token keeps its label (the stream's next token at its place in the stream), its document's
    position and its loss mask; only its place in the sequence changes, a whole document at a time."""
    toks = np.concatenate([np.append(d, EOS) for d in stream()])
    L = 32
    pos = global_positions(L // world, world, rank, layout).numpy()
    data = DocumentPackedData(PackedData(toks, L, 0.1, 0, pos), EOS, DocumentBalance(world, layout))
    seqs = [3, 5, 8, 13, 21, 34]
    mb = data.rows(seqs)
    reordered = 0
    for b, s in enumerate(seqs):
        # brute force: the row's documents (a new one after every EOS), as (stream index, position) per token
        docs, cur = [], []
        for i in range(L):
            cur.append((s * L + i, len(cur)))
            if toks[s * L + i] == EOS or i == L - 1:
                docs.append(cur)
                cur = []
        order = balanced_order(torch.tensor([len(d) for d in docs]), world, layout).tolist()
        reordered += order != list(range(len(docs)))
        row = [t for d in order for t in docs[d]]
        assert mb.cu_seqlens[b].tolist() == np.cumsum([0] + [len(docs[d]) for d in order]).tolist()
        assert mb.tokens[b].tolist() == [int(toks[row[p][0]]) for p in pos]
        assert mb.labels[b].tolist() == [int(toks[row[p][0] + 1]) for p in pos]
        assert mb.positions[b].tolist() == [row[p][1] for p in pos]
        assert mb.loss_mask[b].tolist() == [0.0 if toks[row[p][0]] == EOS else 1.0 for p in pos]
    assert reordered >= 2


def test_balance_documents_config():
    def cfg(data, **parallel):
        return load_config(None, tiny(data=data, parallel=parallel))
    with pytest.raises(ConfigError, match="data.balance_documents = true .* needs data.pack_documents = true"):
        cfg({"balance_documents": True})
    with pytest.raises(ConfigError, match="data.balance_documents = true .* needs parallel.sp > 1, got "
                                          "parallel.sp = 1"):
        validate(cfg({"balance_documents": True, "pack_documents": True}), 1)
    validate(cfg({"balance_documents": True, "pack_documents": True}, sp=2), 2)
    with pytest.raises(ConfigError, match="data.balance_documents"):
        cfg({"balance_documents": "yes", "pack_documents": True})


def _cfg(path, balance=False, **parallel):
    return tiny(model={"pattern": "LLLN", "n_layers": 4, "linear_variant": "simple_gla"},
                parallel={"layout": "zigzag", "linear_backend": "torch", **parallel},
                data={"source": "tokens", "path": path, "pack_documents": True, "seq_len": 64,
                      "balance_documents": balance})


def _loss_and_grads(model, mb):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(mb.tokens, mb.labels, mb.cu_seqlens, mb.positions, mb.loss_mask).sum()
    return loss.detach(), [g.detach().clone() for g in torch.autograd.grad(loss, params)]


def _one_process(path):
    """One process (SP 1): a microbatch in the order balanced for 4 zigzag ranks against the given order."""
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, _cfg(path)))
    t.model.double()
    given = t.data.train_microbatches(0, 4, 4, 0, 1)[0]       # one microbatch of 4 sequences
    balanced = DocumentPackedData(t.data, EOS, DocumentBalance(4, "zigzag")).train_microbatches(0, 4, 4, 0, 1)[0]
    l0, g0 = _loss_and_grads(t.model, given)
    l1, g1 = _loss_and_grads(t.model, balanced)
    return {"moved": int((given.tokens != balanced.tokens).sum()), "loss": (float(l0), float(l1)),
            "grad_err": max(rel_err(a, b) for a, b in zip(g1, g0)),
            "dtype": str(next(t.model.parameters()).dtype)}


def _sp2(path, balance):
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, _cfg(path, balance, sp=2, softmax_method="ring")))
    tokens = [mb.tokens for mb in t.data.train_microbatches(0, 4, 1, t.ranks.dp_rank, 1)]
    return {"loss": t.train_step()["loss"], "tokens": tokens, **local_tensors(t)}


def _worker(rank, world, path):
    return {"one": _one_process(path), "on": _sp2(path, True), "off": _sp2(path, False)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("balanced") / "docs.u16")
    write_token_file(path, stream(seed=1, n_docs=400), 257, EOS)
    return run_distributed(_worker, 2, path)


def test_reordered_microbatch_gives_the_same_loss_and_gradients(runs):
    for r in runs:
        one = r["one"]
        assert one["dtype"] == "torch.float64" and one["moved"] > 0
        l0, l1 = one["loss"]
        assert abs(l1 - l0) <= 1e-6 * abs(l0)
        assert one["grad_err"] <= 1e-6


def test_sp2_step_with_balanced_documents_matches_the_given_order(runs):
    on, off = [r["on"] for r in runs], [r["off"] for r in runs]
    assert any(not torch.equal(a, b) for r in runs for a, b in zip(r["on"]["tokens"], r["off"]["tokens"]))
    assert abs(on[0]["loss"] - off[0]["loss"]) <= 1e-5 * abs(off[0]["loss"])
    _, g_on = assemble(on)
    _, g_off = assemble(off)
    for name in g_off:
        assert rel_err(g_on[name], g_off[name]) <= 1e-5, name
