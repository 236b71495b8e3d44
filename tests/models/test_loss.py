"""The chunked cross entropy from hidden states equals the loss on the whole logits, forward and backward.

Float64 against a float64 log-softmax reference (TP = 1 in this process, TP = 2 on two gloo processes that
each hold half of the vocabulary), and float32 against megatron-core's vocab_parallel_cross_entropy on the
full logits (TP = 1 and 2). Chunks that do not divide the token count, a per-token gradient that is the same
for every token (the trainer's) and one that is not (the recomputing backward).
"""
from __future__ import annotations

import pytest
import torch

from harness import each_tp, rel_err, run_distributed
from longscan.models.loss import chunked_cross_entropy

B, T, D, V = 2, 37, 16, 96


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5  # per-token loss weights
    return h, w, labels, weights


def _reference(h, w, labels, weights, uniform):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = -torch.log_softmax(h @ w.t(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (loss.sum() * 0.3 if uniform else (loss * weights).sum()).backward()
    return loss.detach(), h.grad, w.grad


def _chunked(h, w, labels, weights, uniform, chunk, group=None, tp_rank=0, tp=1):
    vl = w.shape[0] // tp
    h = h.detach().clone().requires_grad_()
    ws = w[tp_rank * vl:(tp_rank + 1) * vl].detach().clone().requires_grad_()
    loss = chunked_cross_entropy(h, ws, labels, chunk, group=group, tp_rank=tp_rank)
    (loss.sum() * 0.3 if uniform else (loss * weights.to(loss.dtype)).sum()).backward()
    return loss.detach(), h.grad, ws.grad


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("chunk", [1, 16, 1000])
def test_float64_matches_log_softmax(chunk, uniform):
    h, w, labels, weights = _inputs(torch.float64)
    ref = _reference(h, w, labels, weights, uniform)
    out = _chunked(h, w, labels, weights, uniform, chunk)
    assert out[0].dtype == torch.float32  # as megatron's loss
    assert rel_err(out[0], ref[0]) < 1e-6  # the loss is float32
    for a, b in zip(out[1:], ref[1:]):
        assert rel_err(a, b) < 1e-6


def test_no_gradients_in_eval():
    h, w, labels, _ = _inputs(torch.float32)
    with torch.no_grad():
        loss = chunked_cross_entropy(h, w, labels, 8)
    ref = -torch.log_softmax(h.double() @ w.double().t(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert rel_err(loss, ref) < 1e-6


def test_bad_arguments_name_the_parameter():
    h, w, labels, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens"):
        chunked_cross_entropy(h, w, labels, 0)
    with pytest.raises(ValueError, match="do not match"):
        chunked_cross_entropy(h, w[:, :3], labels, 4)


def _megatron(h, w, labels, weights, uniform, tp_rank, tp):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    vl = w.shape[0] // tp
    h = h.detach().clone().requires_grad_()
    ws = w[tp_rank * vl:(tp_rank + 1) * vl].detach().clone().requires_grad_()
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
    logits = copy_to_tensor_model_parallel_region(h) @ ws.t()  # the column layer's input region
    loss = vocab_parallel_cross_entropy(logits.float(), labels)
    (loss.sum() * 0.3 if uniform else (loss * weights.float()).sum()).backward()
    return loss.detach(), h.grad, ws.grad


def _ranks(rank, world):
    from megatron.core import parallel_state as ps
    out = {}
    for tp in each_tp():
        group, tp_rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
        for uniform in (True, False):
            for chunk in (5, 64):
                h, w, labels, weights = _inputs(torch.float64, seed=1)
                out[("f64", tp, uniform, chunk)] = (_chunked(h, w, labels, weights, uniform, chunk, group, tp_rank,
                                                             tp), _reference(h, w, labels, weights, uniform))
                h, w, labels, weights = _inputs(torch.float32, seed=2)
                out[("f32", tp, uniform, chunk)] = (
                    _chunked(h, w, labels, weights, uniform, chunk, group, tp_rank, tp),
                    _megatron(h, w, labels, weights, uniform, tp_rank, tp))
        out[("tp_rank", tp)] = tp_rank
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_ranks, 2)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("chunk", [5, 64])
@pytest.mark.parametrize("kind", ["f64", "f32"])
def test_vocab_parallel(ranks, kind, tp, uniform, chunk):
    """Every rank's loss and hidden gradient are the whole vocabulary's; its weight gradient is its slice's."""
    tol = 1e-6 if kind == "f64" else 1e-5
    for res in ranks:
        (loss, dh, dw), (rloss, rdh, rdw) = res[(kind, tp, uniform, chunk)]
        if kind == "f64":  # the reference holds the whole weight: take this rank's rows
            vl = V // tp
            r = res[("tp_rank", tp)]
            rdw = rdw[r * vl:(r + 1) * vl]
        assert rel_err(loss, rloss) < tol
        assert rel_err(dh, rdh) < tol
        assert rel_err(dw, rdw) < tol


def test_keeps_no_logits_for_the_backward():
    """What the loss keeps is the size of the hidden states and the weight, never `[tokens, vocab]`."""
    h, w, labels, _ = _inputs(torch.float32)
    h.requires_grad_(), w.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked_cross_entropy(h, w, labels, 8)
    assert saved and max(saved) <= max(h.numel(), w.numel()) < B * T * V
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        torch.log_softmax(h @ w.t(), -1).gather(-1, labels.unsqueeze(-1))  # the whole-logits loss does keep them
    assert max(saved) == B * T * V


def test_bf16_autocast_matmul_like_the_output_layer():
    """Under autocast the logits come from a bf16 matmul, as the output layer's do: the loss is the one of
    the autocast logits (a float32 matmul would differ at bf16 round-off), the gradients agree to it."""
    h, w, labels, weights = _inputs(torch.float32, seed=3)

    def run(chunked):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                loss = chunked_cross_entropy(hh, ww, labels, 16)
            else:
                logits = (hh @ ww.t()).float()
                loss = -torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        (loss * weights.float()).sum().backward()
        return loss.detach(), hh.grad, ww.grad
    out, ref = run(True), run(False)
    assert rel_err(out[0], ref[0]) < 1e-6
    for a, b in zip(out[1:], ref[1:]):
        assert rel_err(a, b) < 2e-2
