"""A log decay of -inf (a full reset, S_t = k_t v_tᵀ) in the chunked torch backend, against the recurrence."""
import pytest
import torch

from harness import rel_err
from linear_cases import make_inputs
from longscan.kernels.linear_attention import chunk_linear_attention, naive_recurrent_linear_attention
from longscan.kernels.linear_attention import torch_chunk

T = 70  # two scalar chunks (64), three per-key chunks (32)
# first token, inside a chunk, a per-key chunk's last token, a scalar chunk's last token, the last token
POSITIONS = [(0,), (10,), (31,), (63,), (T - 1,), (0, 10, 31, 40, 63, T - 1)]


def reset_inputs(decay, positions, dtype, seed):
    x = make_inputs(decay, 2, T, 3, 8, 5, dtype, seed=seed)
    g = x["g"]
    for i, t in enumerate(positions):   # vary the (batch, head) that resets; the first one resets everywhere
        if i == 0:
            g[:, t] = float("-inf")
        elif decay == "g_scalar":
            g[i % 2, t, i % 3] = float("-inf")
        else:
            g[i % 2, t, i % 3, : 1 + i % 8] = float("-inf")   # only some keys of that head
    return x


def run(x, backend, with_state, dtype):
    leaves = {n: t.to(dtype).clone().requires_grad_() for n, t in x.items() if t is not None}
    h0 = leaves["initial_state"] if with_state else None
    fn = naive_recurrent_linear_attention if backend == "naive" else (
        lambda *a, **kw: chunk_linear_attention(*a, **kw, backend="torch"))
    o, s = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], None, initial_state=h0, output_final_state=True)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dht = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    names = ["q", "k", "v", "g"] + (["initial_state"] if with_state else [])
    grads = torch.autograd.grad((o, s), [leaves[n] for n in names], (do, dht))
    return o, s, dict(zip(names, grads))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("positions", POSITIONS, ids=str)
@pytest.mark.parametrize("decay", ["g_scalar", "g_per_key"])
@pytest.mark.parametrize("with_state", [True, False])
def test_torch_backend_full_reset_matches_naive(decay, positions, with_state, dtype, tol):
    x = reset_inputs(decay, positions, torch.float64, seed=len(positions) + positions[0])
    o_ref, s_ref, g_ref = run(x, "naive", with_state, torch.float64)
    o, s, grads = run(x, "torch", with_state, dtype)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, o_ref) < tol
    assert rel_err(s, s_ref) < tol
    for name, ref in g_ref.items():
        assert torch.isfinite(grads[name]).all(), name
        assert rel_err(grads[name], ref) < tol, name
    assert (grads["g"][x["g"] == float("-inf")] == 0).all()


@pytest.mark.parametrize("decay", ["g_scalar", "g_per_key"])
def test_segment_pieces_with_full_reset(decay):
    """segment_state, add_prefix and prefix_grad of a segment with -inf gates, against the recurrence."""
    x = reset_inputs(decay, POSITIONS[-1][1:], torch.float64, seed=3)   # tokens before the first reset see P
    q, k, v, g, P = x["q"], x["k"], x["v"], x["g"], x["initial_state"]
    S, logd = torch_chunk.segment_state(k, v, g)
    _, S_ref = naive_recurrent_linear_attention(q, k, v, g, output_final_state=True)
    assert torch.isfinite(S).all() and rel_err(S, S_ref) < 1e-12
    assert (logd == float("-inf")).all()    # the first reset is in every (batch, head, key)
    o0, _ = naive_recurrent_linear_attention(q, k, v, g)
    Pl = P.clone().requires_grad_()
    o_ref, _ = naive_recurrent_linear_attention(q, k, v, g, initial_state=Pl)
    o = torch_chunk.add_prefix(o0, q, g, None, 8 ** -0.5, P)
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < 1e-12
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dP_ref, = torch.autograd.grad(o_ref, Pl, do)
    assert dP_ref.norm() > 0                 # P reaches the tokens before the first reset
    dP = torch_chunk.prefix_grad(q, g, None, 8 ** -0.5, do)
    assert torch.isfinite(dP).all() and rel_err(dP, dP_ref) < 1e-12
