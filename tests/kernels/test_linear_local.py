"""Single-device linear attention: every backend against the float64 recurrent reference."""
import pytest
import torch

from harness import rel_err
from linear_cases import DECAYS, make_inputs
from longscan.kernels.linear_attention import (check_backend_supports, chunk_linear_attention, get_backend,
                                               naive_recurrent_linear_attention)
from longscan.kernels.linear_attention import torch_chunk
from longscan.kernels.linear_attention.backend import LinearBackend, TorchBackend

GRAD_NAMES = ("q", "k", "v", "g", "g_gamma", "initial_state")


def reference(x, with_state=True):
    """Output, final state and gradients in float64 through the recurrent reference."""
    leaves = {n: (t.double().clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    h0 = leaves["initial_state"] if with_state else None
    o, s = naive_recurrent_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"],
                                            leaves["g_gamma"], None, h0, True)
    return o, s, leaves


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("T", [1, 37, 130])  # odd lengths, shorter and longer than a chunk
@pytest.mark.parametrize("with_state", [True, False])
def test_torch_backend_matches_reference(decay, T, with_state, dtype, tol):
    x = make_inputs(decay, 2, T, 3, 8, 5, dtype, seed=T)
    o_ref, s_ref, ref_leaves = reference(x, with_state)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    names = [n for n in GRAD_NAMES if x[n] is not None and (with_state or n != "initial_state")]
    ref_grads = torch.autograd.grad((o_ref, s_ref), [ref_leaves[n] for n in names], (do, dht))

    leaves = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o, s = chunk_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["g_gamma"],
                                  initial_state=leaves["initial_state"] if with_state else None,
                                  output_final_state=True, backend="torch")
    assert o.dtype == dtype and s.dtype == dtype
    assert rel_err(o, o_ref) <= tol
    assert rel_err(s, s_ref) <= tol
    grads = torch.autograd.grad((o, s), [leaves[n] for n in names], (do.to(dtype), dht.to(dtype)))
    for n, got, want in zip(names, grads, ref_grads):
        assert got.shape == want.shape, n
        if want.norm() == 0:  # e.g. the gate of a 1-token sequence from a zero state: exactly no gradient
            assert got.norm() <= tol * do.norm(), n
        else:
            assert rel_err(got, want) <= tol, n


@pytest.mark.parametrize("decay", DECAYS)
def test_sp_pieces_match_definitions(decay):
    """segment_state, add_prefix and prefix_grad equal what the full recurrence implies."""
    x = make_inputs(decay, 2, 45, 3, 8, 5, torch.float64, seed=7)
    P = x["initial_state"]
    for name in ("torch", "naive"):
        impl = get_backend(name, torch.device("cpu"))
        o0, s0, _ = impl.forward(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], 0.3, None, True)
        oP, sP, _ = impl.forward(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], 0.3, P, True)
        S, logd, _ = impl.segment_state(x["k"], x["v"], x["g"], x["g_gamma"])
        assert rel_err(S, s0) <= 1e-12
        # Γ ⊙ P is what the segment does to an entering state.
        assert rel_err(logd.exp().unsqueeze(-1) * P + S, sP) <= 1e-12
        assert rel_err(impl.add_prefix(o0, x["q"], x["g"], x["g_gamma"], 0.3, P), oP) <= 1e-12
        do = torch.randn_like(o0)
        _, _, _, _, dh0 = impl.backward(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], 0.3, P, do, None)
        dP, logd_q, _ = impl.prefix_grad(x["q"], x["g"], x["g_gamma"], 0.3, do)
        assert rel_err(dP, dh0) <= 1e-12
        assert torch.allclose(logd_q, logd, rtol=1e-12, atol=1e-12)   # the same total as the state pass's


def test_bad_inputs_name_the_parameter():
    x = make_inputs("g_scalar", 1, 8, 2, 4, 4, torch.float32, seed=0)
    q, k, v, g = x["q"], x["k"], x["v"], x["g"]
    cases = [
        (dict(q=q, k=k[:, :4], v=v), ValueError, "k must have the shape"),
        (dict(q=q, k=k, v=v[:, :4]), ValueError, "v must be"),
        (dict(q=q, k=k.double(), v=v), TypeError, "k.dtype"),
        (dict(q=q[0], k=k, v=v), ValueError, "q must be 4-D"),
        (dict(q=q, k=k, v=v, g=g, g_gamma=torch.zeros(2)), ValueError, "at most one of g and g_gamma"),
        (dict(q=q, k=k, v=v, g=g[..., :1]), ValueError, "g must be"),
        (dict(q=q, k=k, v=v, g_gamma=torch.zeros(3)), ValueError, "g_gamma must be"),
        (dict(q=q, k=k, v=v, initial_state=torch.zeros(1, 2, 4, 3)), ValueError, "initial_state must be"),
        (dict(q=q, k=k, v=v, backend="cuda-magic"), ValueError, "backend must be one of"),
        (dict(q=q.long(), k=k, v=v), TypeError, "q must be a floating-point"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            chunk_linear_attention(**kwargs)


def test_chunk_padding_leaves_state_exact():
    """A length that is not a multiple of the chunk pads with zeros; the final state must not change."""
    x = make_inputs("g_per_key", 1, torch_chunk.CHUNK_PER_KEY + 3, 2, 4, 4, torch.float64, seed=3)
    _, s_ref, _ = reference(x)
    _, s = torch_chunk.forward(x["q"], x["k"], x["v"], x["g"], None, None, x["initial_state"], True)
    assert rel_err(s, s_ref) <= 1e-12


@pytest.mark.parametrize("backend", ["naive", "torch", "triton"])
@pytest.mark.parametrize("decay,name", [("g_scalar", "g"), ("g_per_key", "g"), ("g_gamma", "g_gamma")])
def test_positive_log_decay_refused(decay, name, backend, monkeypatch):
    """A log decay above 0 is refused by every backend before any kernel (CPU tensors: always)."""
    monkeypatch.delenv("LONGSCAN_CHECKS", raising=False)
    x = make_inputs(decay, 1, 8, 2, 16, 16, torch.float32, seed=5)   # head dims the Triton kernels take
    args = dict(initial_state=x["initial_state"], backend=backend)
    chunk_linear_attention(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], **args)   # log decays < 0: fine
    bad = x[name].clone()
    bad.view(-1)[1] = 0.25
    x[name] = bad
    with pytest.raises(ValueError, match=f"^{name} \\(a log decay\\) must be <= 0, got a maximum of 0.25"):
        chunk_linear_attention(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], **args)


def test_zero_log_decay_accepted():
    x = make_inputs("g_scalar", 1, 8, 2, 4, 4, torch.float64, seed=6)
    o, _ = chunk_linear_attention(x["q"], x["k"], x["v"], torch.zeros_like(x["g"]), backend="torch")
    o_ref, _ = chunk_linear_attention(x["q"], x["k"], x["v"], backend="torch")
    assert rel_err(o, o_ref) <= 1e-12


def test_backend_without_g_gamma_grad_refuses_a_learnable_g_gamma():
    x = make_inputs("g_gamma", 1, 8, 2, 4, 4, torch.float32, seed=0)
    class FakeBackend(TorchBackend):
        name = "fake_backend"
        supports_g_gamma_grad = False
    impl = FakeBackend()
    with pytest.raises(ValueError, match="g_gamma requires grad.*fake_backend"):
        check_backend_supports(impl, x["g_gamma"].requires_grad_())
    check_backend_supports(impl, x["g_gamma"].detach())     # a fixed g_gamma is fine


def test_every_backend_implements_the_contract():
    """Every backend get_backend gives is a LinearBackend, and forward always returns a (possibly empty) record."""
    x = make_inputs("g_scalar", 1, 8, 2, 4, 4, torch.float64, seed=2)
    for name in ("auto", "torch", "naive"):
        impl = get_backend(name, torch.device("cpu"))
        assert isinstance(impl, LinearBackend), name
        out = impl.forward(x["q"], x["k"], x["v"], x["g"], None, None, None, True, keep=True)
        assert len(out) == 3 and out[2] is None, name
    with pytest.raises(TypeError, match="options must be a LinearKernelOptions"):
        get_backend("torch", torch.device("cpu"), options={"chunk": 16})
