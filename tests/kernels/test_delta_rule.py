"""The delta rule on one device: the recurrence against the rule written as explicit K×K matrices, the
chunked torch backend against the float64 recurrence (several chunks and a padded last one), forward and
backward with states, the segment's affine map (M, S_loc), and the input checks."""
import pytest
import torch

from delta_cases import KINDS, make_inputs
from harness import rel_err
from longscan.kernels.delta_rule import chunk_delta_rule, naive_recurrent_delta_rule, torch_chunk
from longscan.kernels.delta_rule import _naive_segment_transition

NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def transitions(k, beta, g):
    """A_t = (I - β_t k_t k_tᵀ) D_t as explicit matrices `[B, T, H, K, K]`."""
    B, T, H, K = k.shape
    eye = torch.eye(K, dtype=k.dtype)
    A = eye - beta[..., None, None] * k.unsqueeze(-1) * k.unsqueeze(-2)
    if g is not None:
        d = (g.unsqueeze(-1) if g.dim() == 3 else g).exp().expand(B, T, H, K)
        A = A * d.unsqueeze(-2)          # A · Diag(d): scales column j by d_j
    return A


@pytest.mark.parametrize("kind", KINDS)
def test_recurrence_matches_explicit_matrices(kind):
    x = make_inputs(kind, 2, 6, 2, 4, 3, torch.float64, seed=1)
    A = transitions(x["k"], x["beta"], x["g"])
    S = x["initial_state"]
    outs = []
    for t in range(6):
        S = A[:, t] @ S + x["beta"][:, t, :, None, None] * x["k"][:, t].unsqueeze(-1) * x["v"][:, t].unsqueeze(-2)
        outs.append(0.7 * torch.einsum("bhkv,bhk->bhv", S, x["q"][:, t]))
    o, s = naive_recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], 0.7, x["initial_state"], True)
    assert rel_err(o, torch.stack(outs, 1)) < 1e-12
    assert rel_err(s, S) < 1e-12


def grads(fn, x, names, do, dht):
    leaves = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o, s = fn(**leaves)
    wanted = [n for n in names if leaves[n] is not None]
    gs = torch.autograd.grad((o, s), [leaves[n] for n in wanted], (do, dht))
    return o, s, dict(zip(wanted, gs))


@pytest.mark.parametrize("T, chunk", [(13, 4), (8, 8), (5, 32)])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_chunked_matches_recurrence_float64(kind, T, chunk):
    B, H, K, V = 2, 2, 5, 3
    x = make_inputs(kind, B, T, H, K, V, torch.float64, seed=T)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    ref = grads(lambda **a: naive_recurrent_delta_rule(**a, output_final_state=True), x, NAMES, do, dht)
    got = grads(lambda **a: torch_chunk.forward(**a, output_final_state=True, chunk=chunk), x, NAMES, do, dht)
    assert rel_err(got[0], ref[0]) < 1e-10
    assert rel_err(got[1], ref[1]) < 1e-10
    assert set(got[2]) == set(ref[2])
    for n in ref[2]:
        assert rel_err(got[2][n], ref[2][n]) < 1e-10, n


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_delta_rule_float32_and_no_state(kind):
    x = make_inputs(kind, 1, 40, 2, 8, 4, torch.float64, seed=5)
    ref, _ = naive_recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"])
    x32 = {n: (t.float() if t is not None else None) for n, t in x.items()}
    o, s = chunk_delta_rule(x32["q"], x32["k"], x32["v"], x32["beta"], x32["g"])
    assert s is None and o.dtype == torch.float32
    assert rel_err(o, ref) < 1e-5
    o2, s2 = chunk_delta_rule(x32["q"], x32["k"], x32["v"], x32["beta"], x32["g"], output_final_state=True)
    assert s2.dtype == torch.float32 and s2.shape == (1, 2, 8, 4) and torch.allclose(o, o2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_segment_transition_is_the_affine_map(kind, impl):
    x = make_inputs(kind, 2, 9, 2, 4, 3, torch.float64, seed=11)
    fn = _naive_segment_transition if impl == "naive" else (lambda *a: torch_chunk.segment_transition(*a, chunk=4))
    S_loc, M = fn(x["k"], x["v"], x["beta"], x["g"])
    A = transitions(x["k"], x["beta"], x["g"])
    prod = torch.eye(4, dtype=torch.float64).expand(2, 2, 4, 4)
    for t in range(9):
        prod = A[:, t] @ prod
    assert rel_err(M, prod) < 1e-12
    _, s0 = naive_recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], None, None, True)
    assert rel_err(S_loc, s0) < 1e-12
    _, s1 = naive_recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], None, x["initial_state"], True)
    assert rel_err(M @ x["initial_state"] + S_loc, s1) < 1e-12


def test_backends_agree_and_names():
    x = make_inputs("kda", 1, 7, 1, 4, 4, torch.float64, seed=2)
    a = chunk_delta_rule(**x, output_final_state=True, backend="naive")
    b = chunk_delta_rule(**x, output_final_state=True, backend="torch")
    assert rel_err(b[0], a[0]) < 1e-10 and rel_err(b[1], a[1]) < 1e-10
    with pytest.raises(ValueError, match="backend must be one of"):
        chunk_delta_rule(**x, backend="fla")


def _bad(name, value):
    x = make_inputs("gated", 1, 4, 2, 4, 3, torch.float32, seed=0)
    x[name] = value(x) if callable(value) else value
    return x


@pytest.mark.parametrize("name, value, message", [
    ("beta", lambda x: x["beta"][..., :1], r"beta must be \[B, T, H\] = \(1, 4, 2\)"),
    ("beta", lambda x: x["beta"] * 0, r"beta must lie in \(0, 1\]"),
    ("beta", lambda x: x["beta"] + 1, r"beta must lie in \(0, 1\]"),
    ("beta", lambda x: x["beta"].long(), "beta must be a floating-point"),
    ("g", lambda x: -x["g"], "g \\(a log decay\\) must be <= 0"),
    ("g", lambda x: x["g"][..., :1], r"g must be \[B, T, H\]"),
    ("k", lambda x: x["k"][..., :3], "k must have the shape of q"),
    ("v", lambda x: x["v"][:, :3], r"v must be \[B, T, H, V\]"),
    ("initial_state", lambda x: x["initial_state"][..., :2], r"initial_state must be \[B, H, K, V\]"),
])
def test_bad_inputs_are_named(name, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        chunk_delta_rule(**_bad(name, value))


def test_torch_backend_keeps_no_per_key_decay_tensor():
    """What autograd keeps for KDA grows like T·(K + V + C) and a state a chunk, not like the per-key
    decays T·C·K of the chunks (those are recomputed in the backward)."""
    T, K, V, C = 64, 8, 8, 16
    x = make_inputs("kda", 1, T, 1, K, V, torch.float64, seed=4)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    kept = []

    def pack(t):
        kept.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, s = torch_chunk.forward(**leaves, output_final_state=True, chunk=C)
    assert kept and max(kept) <= T * max(K, V, C) < T * C * K
    (o.sum() + s.sum()).backward()
    assert all(leaves[n].grad is not None for n in leaves)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_inputs_compute_in_float32(kind):
    """bf16 q, k, v (as under autocast) with float32 β and g: bf16 output and gradients, float32 state,
    within bf16 round-off of the float64 recurrence."""
    x = make_inputs(kind, 1, 24, 2, 8, 8, torch.float64, seed=9)
    ref, ref_s = naive_recurrent_delta_rule(**x, output_final_state=True)
    low = {n: (t.to(torch.bfloat16) if n in ("q", "k", "v") else t.float()).requires_grad_()
           for n, t in x.items() if t is not None}
    o, s = chunk_delta_rule(**low, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o, ref) < 2e-2 and rel_err(s, ref_s) < 2e-2
    (o.float().square().sum() + s.sum()).backward()
    assert all(low[n].grad.dtype == low[n].dtype and low[n].grad.isfinite().all() for n in low)


def test_per_key_decays_in_slices(monkeypatch):
    """The per-key decays built a few chunks at a time give the same result as all at once."""
    x = make_inputs("kda", 2, 29, 3, 4, 3, torch.float64, seed=8)
    whole = torch_chunk.forward(**x, output_final_state=True, chunk=4)
    monkeypatch.setattr(torch_chunk, "DECAY_ELEMENTS", 4 * 4 * 4 * 5)   # 5 of the 2·3·8 chunks a slice
    sliced = torch_chunk.forward(**x, output_final_state=True, chunk=4)
    ref = naive_recurrent_delta_rule(**x, output_final_state=True)
    for a, b, r in zip(whole, sliced, ref):
        assert rel_err(b, r) < 1e-12 and rel_err(a, r) < 1e-12
