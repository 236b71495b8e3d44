"""Log decays of -inf (full resets, S_t = k_t v_tᵀ) and non-finite inputs in the Triton linear-attention kernels,
against the float64 recurrence.

CPU: the Triton interpreter in float32, tiny shapes, chunks of 16 (T = 37: three chunks, the last one partial),
segments forced through LinearKernelOptions so the state passes and scans run too. GPU (skipped without CUDA):
float32 and bf16 at the default chunks.
"""
import pytest
import torch

from harness import rel_err
from linear_cases import make_inputs

triton = pytest.importorskip("triton")

from longscan.kernels.linear_attention import LinearKernelOptions, naive_recurrent_linear_attention  # noqa: E402
from longscan.kernels.linear_attention import torch_chunk  # noqa: E402
from longscan.kernels.linear_attention import triton as tc  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
INF = float("-inf")

T = 37
# first token, inside a chunk, a chunk's last token, the last token, several in one chunk (two adjacent)
POSITIONS = {"first": (0,), "inside": (5,), "chunk_end": (15,), "last": (T - 1,), "several": (17, 20, 21, 30)}


def small(segments=None):
    return LinearKernelOptions(chunk=16, chunk_per_key=16, segments=segments)


def reset_inputs(decay, positions, seed, B=2, T=T, H=2, K=16, V=16, keys=None):
    """Random float64 inputs with -inf gates at ``positions`` in batch 0 and one head of batch 1 (per key: on the
    keys ``keys``, None: every key, a full reset)."""
    x = make_inputs(decay, B, T, H, K, V, torch.float64, seed=seed)
    g = x["g"]
    sel = slice(None) if keys is None else keys
    for t in positions:
        if g.dim() == 3:
            g[0, t] = INF
            g[B - 1, t, H - 1] = INF
        else:
            g[0, t, :, sel] = INF
            g[B - 1, t, H - 1, sel] = INF
    return x


def reference(x, with_state, do, dht):
    """o, final state and (dq, dk, dv, dg, dh0) in float64 through the recurrence."""
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    h0 = leaves["initial_state"] if with_state else torch.zeros_like(x["initial_state"]).requires_grad_()
    o, s = naive_recurrent_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"], None, None, h0, True)
    outs, grads = [o], [do]
    if dht is not None:
        outs.append(s)
        grads.append(dht)
    res = torch.autograd.grad(outs, [leaves["q"], leaves["k"], leaves["v"], leaves["g"], h0], grads)
    return o, s, res


def check(x, with_state, options, dtype=torch.float32, tol=1e-4, with_dht=True, reuse=True, seed=0):
    """Forward (o, final state) and backward (dq, dk, dv, dg, dh0) of the Triton kernels against the float64
    recurrence; every result finite, the gate gradient at a -inf gate 0 (to round-off)."""
    B, T_, H, K = x["q"].shape
    gen = torch.Generator().manual_seed(seed + 11)
    do = torch.randn(B, T_, H, x["v"].shape[-1], generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, x["v"].shape[-1], generator=gen, dtype=torch.float64) if with_dht else None
    o_ref, s_ref, g_ref = reference(x, with_state, do, dht)
    y = {n: t.to(DEV, dtype if n != "initial_state" else torch.float32) for n, t in x.items() if t is not None}
    h0 = y["initial_state"] if with_state else None
    o, ht, *saved = tc.forward(y["q"], y["k"], y["v"], y["g"], None, None, h0, True, return_saved=reuse,
                               options=options)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert rel_err(o.cpu(), o_ref) <= tol
    assert rel_err(ht.cpu(), s_ref) <= tol
    grads = tc.backward(y["q"], y["k"], y["v"], y["g"], None, None, h0, do.to(DEV, dtype),
                        dht.to(DEV, torch.float32) if dht is not None else None,
                        kv_states=saved[0] if reuse else None, options=options)
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dh0"), grads, g_ref):
        assert torch.isfinite(got).all(), name
        err = rel_err(got.cpu(), want)
        assert err <= tol, f"{name}: rel err {err:.2e}"
    dg, g = grads[3].cpu().double(), x["g"]
    assert dg[g == INF].abs().max() <= tol * dg.abs().max()


# -- 1. scalar gates g [B, T, H] -------------------------------------------------------------------------------------

@pytest.mark.parametrize("segments", [None, 2])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("where", list(POSITIONS))
def test_scalar_gate_resets(where, with_state, segments):
    x = reset_inputs("g_scalar", POSITIONS[where], seed=len(where))
    check(x, with_state, small(segments), seed=len(where))


def test_scalar_gate_at_reset_has_zero_gradient():
    """The -inf gate's own gradient is exactly 0, as the torch backend and the recurrence give it."""
    x = reset_inputs("g_scalar", (0, 5, 20), seed=3)
    y = {n: t.float() for n, t in x.items() if t is not None}
    do = torch.randn(2, T, 2, 16, generator=torch.Generator().manual_seed(4))
    dht = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    dg = tc.backward(y["q"], y["k"], y["v"], y["g"], None, None, y["initial_state"], do, dht,
                     options=small(2))[3]
    assert (dg[x["g"] == INF] == 0).all() and (dg[x["g"] != INF] != 0).all()


# -- 2. per-key gates g [B, T, H, K] ---------------------------------------------------------------------------------

@pytest.mark.parametrize("segments", [None, 2])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("where", list(POSITIONS))
def test_per_key_full_resets(where, with_state, segments):
    x = reset_inputs("g_per_key", POSITIONS[where], seed=len(where) + 1)
    check(x, with_state, small(segments), seed=len(where))


@pytest.mark.parametrize("segments", [None, 2])
def test_per_key_resets_on_some_keys(segments):
    """-inf on only some keys of a token: each key keeps its own reset counts, so this is exact too."""
    x = reset_inputs("g_per_key", (0, 9, 15, 20, 21, 36), seed=9, keys=slice(3, 11))
    check(x, True, small(segments), seed=9)


@pytest.mark.parametrize("segments", [None, 2])
def test_per_key_resets_in_steep_chunks(segments):
    """A reset inside a chunk whose gates also fall past the per-key levels' span (the levels kernel's exact
    terms, now per reset span) on one key tile of 16 of two."""
    x = reset_inputs("g_per_key", (3, 20, 24), seed=5, K=32)
    g = x["g"]
    g[:, 1, :, 0], g[:, 8, :, 1], g[:, 22, :, 2] = -90.0, -200.0, -70.0
    g[:, 23, :, 3] = -65.0
    check(x, True, small(segments).with_blocks(16), seed=5)


# -- the state passes and scans SP runs ------------------------------------------------------------------------------

@pytest.mark.parametrize("segments", [None, 3])
@pytest.mark.parametrize("decay", ["g_scalar", "g_per_key"])
def test_sp_pieces_with_resets(decay, segments):
    """segment_state, add_prefix and prefix_grad of a segment with -inf gates against the torch backend's (exact
    with -inf), and the forward and backward fed their records."""
    x = reset_inputs(decay, (5, 15, 17, 20, 21), seed=6)
    q, k, v, g, P = (x[n].float() for n in ("q", "k", "v", "g", "initial_state"))
    opts = small(segments)
    scale = 16 ** -0.5
    S, logd, kv = tc.segment_state(k, v, g, return_saved=True, keep_prefixes=True, q=q, factors=True, options=opts)
    S_ref, logd_ref = torch_chunk.segment_state(x["k"], x["v"], x["g"])
    assert torch.isfinite(S).all() and rel_err(S, S_ref) < 1e-5
    assert torch.equal(logd == INF, logd_ref == INF) and rel_err(logd[logd > INF], logd_ref[logd_ref > INF]) < 1e-6
    o0, _ = tc.forward(q, k, v, g, None, None, None, False, kv_states=kv, options=opts)
    o = tc.add_prefix(o0, q, g, None, scale, P, options=opts)
    o_ref, _ = naive_recurrent_linear_attention(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"])
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < 1e-5
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    dP, qdo = tc.prefix_grad(q, g, None, scale, do, return_saved=True, options=opts)
    dP_ref = torch_chunk.prefix_grad(x["q"], x["g"], None, scale, do.double())
    assert torch.isfinite(dP).all() and rel_err(dP, dP_ref) < 1e-5
    grads = tc.backward(q, k, v, g, None, scale, P, do, None, kv_states=kv, qdo_states=qdo, options=opts)
    ref = torch_chunk.backward(x["q"], x["k"], x["v"], x["g"], None, scale, x["initial_state"], do.double(), None)
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dh0"), grads, ref):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < 1e-4, name


# -- 3. non-finite inputs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("decay", ["none", "g_scalar", "g_per_key"])
def test_non_finite_key_leaves_earlier_outputs_alone(decay, bad):
    """A non-finite k at token t: the outputs of the tokens before t (in t's chunk too) are finite and those of
    the clean run; the masks select rather than multiply."""
    x = make_inputs(decay, 1, T, 2, 16, 16, torch.float32, seed=8)
    t = 21
    clean, _ = tc.forward(x["q"], x["k"], x["v"], x["g"], None, None, x["initial_state"], False, options=small(2))
    k = x["k"].clone()
    k[0, t, 1, 3] = bad
    o, _ = tc.forward(x["q"], k, x["v"], x["g"], None, None, x["initial_state"], False, options=small(2))
    assert torch.isfinite(o[:, :t]).all()
    assert torch.equal(o[:, :t], clean[:, :t])
    assert torch.equal(o[:, :, 0], clean[:, :, 0])   # the other head
