"""Log decays of -inf (full resets, S_t = k_t v_tᵀ) and non-finite inputs in the Triton linear-attention kernels,
against the float64 recurrence.

CPU: the Triton interpreter in float32, tiny shapes, chunks of 16 (T = 37: three chunks, the last one partial),
segments forced through LinearKernelOptions so the state passes and scans run too. GPU (skipped without CUDA):
float32 and bf16 at the default chunks. -inf in g directly takes LinearKernelOptions(resets=True) (packed
documents turn it on themselves); without it the kernels refuse -inf on CPU tensors.
"""
import os

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


def small(segments=None, resets=True):
    return LinearKernelOptions(chunk=16, chunk_per_key=16, segments=segments, resets=resets)


def reset_inputs(decay, positions, seed, T=T, H=2, K=16, V=16, keys=None):
    """Random float64 inputs (batch 1) with -inf gates at ``positions`` in head 0 and at the first of them in
    head 1 too (per key: on the keys ``keys``, None: every key, a full reset)."""
    x = make_inputs(decay, 1, T, H, K, V, torch.float64, seed=seed)
    g = x["g"]
    sel = slice(None) if keys is None else keys
    for i, t in enumerate(positions):
        heads = slice(None) if i == 0 else 0
        if g.dim() == 3:
            g[0, t, heads] = INF
        else:
            g[0, t, heads, sel] = INF
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


def check(x, with_state, options, dtype=torch.float32, tol=1e-4, with_dht=True, reuse=True, seed=0, need_dg=True):
    """Forward (o, final state) and backward (dq, dk, dv, dg, dh0; dg only with need_dg) of the Triton kernels
    against the float64 recurrence; every result finite, the gate gradient at a -inf gate 0 (to round-off)."""
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
                        need_dg, kv_states=saved[0] if reuse else None, options=options)
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dh0"), grads, g_ref):
        if name == "dg" and not need_dg:
            assert got is None
            continue
        assert torch.isfinite(got).all(), name
        err = rel_err(got.cpu(), want)
        assert err <= tol, f"{name}: rel err {err:.2e}"
    if need_dg:
        dg, g = grads[3].cpu().double(), x["g"]
        assert dg[g == INF].abs().max() <= tol * dg.abs().max()


# -- 1. scalar gates g [B, T, H] -------------------------------------------------------------------------------------

# (initial state, final-state gradient, segments): all, over the state passes and scans; none, one segment
STATES = [(True, True, 2), (False, False, None)]


@pytest.mark.parametrize("with_state,with_dht,segments", STATES)
@pytest.mark.parametrize("where", list(POSITIONS))
def test_scalar_gate_resets(where, with_state, with_dht, segments):
    x = reset_inputs("g_scalar", POSITIONS[where], seed=len(where))
    check(x, with_state, small(segments), with_dht=with_dht, seed=len(where))


# Chunks of 16 over 69 tokens: resets at the first token and a chunk's last (chunk 0), at a chunk's first and twice
# inside it (chunk 1), at a chunk's last (chunk 2), none (chunk 3), at the last token (chunk 4); head 1 has only
# the first. So every kernel takes, in one call, both the reset-free arithmetic and the selecting one, and enters
# reset-free chunks from chunks that held resets (on one segment, two and three).
MIXED_T = 69
MIXED = (0, 15, 16, 20, 21, 47, 68)


@pytest.mark.parametrize("segments", [None, 2, 3])
def test_scalar_gate_resets_beside_reset_free_chunks(segments):
    x = reset_inputs("g_scalar", MIXED, seed=17, T=MIXED_T)
    check(x, True, small(segments), seed=17)


def test_scalar_gate_at_reset_has_zero_gradient():
    """The -inf gate's own gradient is exactly 0, as the torch backend and the recurrence give it."""
    x = reset_inputs("g_scalar", (0, 5, 20), seed=3)
    y = {n: t.float().to(DEV) for n, t in x.items() if t is not None}
    do = torch.randn(1, T, 2, 16, generator=torch.Generator().manual_seed(4)).to(DEV)
    dht = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(5)).to(DEV)
    dg = tc.backward(y["q"], y["k"], y["v"], y["g"], None, None, y["initial_state"], do, dht,
                     options=small(2))[3].cpu()
    assert (dg[x["g"] == INF] == 0).all() and (dg[x["g"] != INF] != 0).all()


# -- 2. per-key gates g [B, T, H, K] ---------------------------------------------------------------------------------

@pytest.mark.parametrize("with_state,with_dht,segments", STATES)
@pytest.mark.parametrize("where", list(POSITIONS))
def test_per_key_full_resets(where, with_state, with_dht, segments):
    x = reset_inputs("g_per_key", POSITIONS[where], seed=len(where) + 1)
    check(x, with_state, small(segments), with_dht=with_dht, seed=len(where))


@pytest.mark.parametrize("segments,need_dg", [(None, True), (2, True), (2, False)])
def test_per_key_resets_on_some_keys(segments, need_dg):
    """-inf on only some keys of a token: each key keeps its own reset counts, so this is exact too (need_dg=False:
    the dk kernel's branch without the gate gradient)."""
    x = reset_inputs("g_per_key", (0, 9, 15, 20, 21, 36), seed=9, keys=slice(3, 11))
    check(x, True, small(segments), seed=9, need_dg=need_dg)


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
    q, k, v, g, P = (x[n].float().to(DEV) for n in ("q", "k", "v", "g", "initial_state"))
    opts = small(segments)
    scale = 16 ** -0.5
    S, logd, kv = tc.segment_state(k, v, g, return_saved=True, keep_prefixes=True, q=q, factors=True, options=opts)
    S_ref, logd_ref = torch_chunk.segment_state(x["k"], x["v"], x["g"])
    S, logd = S.cpu(), logd.cpu()
    assert torch.isfinite(S).all() and rel_err(S, S_ref) < 1e-5
    assert torch.equal(logd == INF, logd_ref == INF) and rel_err(logd[logd > INF], logd_ref[logd_ref > INF]) < 1e-6
    o0, _ = tc.forward(q, k, v, g, None, None, None, False, kv_states=kv, options=opts)
    o = tc.add_prefix(o0, q, g, None, scale, P, options=opts).cpu()
    o_ref, _ = naive_recurrent_linear_attention(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"])
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < 1e-5
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    dP, qdo = tc.prefix_grad(q, g, None, scale, do.to(DEV), return_saved=True, options=opts)
    dP = dP.cpu()
    dP_ref = torch_chunk.prefix_grad(x["q"], x["g"], None, scale, do.double())
    assert torch.isfinite(dP).all() and rel_err(dP, dP_ref) < 1e-5
    grads = [t.cpu() for t in tc.backward(q, k, v, g, None, scale, P, do.to(DEV), None, kv_states=kv,
                                           qdo_states=qdo, options=opts)]
    ref = torch_chunk.backward(x["q"], x["k"], x["v"], x["g"], None, scale, x["initial_state"], do.double(), None)
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dh0"), grads, ref):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < 1e-4, name


# -- 3. non-finite inputs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resets", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("decay", ["none", "g_scalar", "g_per_key"])
def test_non_finite_key_leaves_earlier_outputs_alone(decay, bad, resets):
    """A non-finite k at token t: the outputs of the tokens before t (in t's chunk too) are finite and those of
    the clean run; the masks select rather than multiply (with the reset arithmetic and without)."""
    x = {n: (v.to(DEV) if v is not None else None)
         for n, v in make_inputs(decay, 1, T, 2, 16, 16, torch.float32, seed=8).items()}
    t = 21
    opts = small(2, resets)
    clean, _ = tc.forward(x["q"], x["k"], x["v"], x["g"], None, None, x["initial_state"], False, options=opts)
    k = x["k"].clone()
    k[0, t, 1, 3] = bad
    o, _ = tc.forward(x["q"], k, x["v"], x["g"], None, None, x["initial_state"], False, options=opts)
    assert torch.isfinite(o[:, :t]).all()
    assert torch.equal(o[:, :t], clean[:, :t])
    assert torch.equal(o[:, :, 0], clean[:, :, 0])   # the other head


# -- 4. the reset switch (LinearKernelOptions.resets) ---------------------------------------------------------------

REFUSED = r"g holds -inf \(a full reset\) at 2 entries, but LinearKernelOptions\.resets is False.*resets=True"


@pytest.mark.parametrize("decay", ["g_scalar", "g_per_key"])
def test_inf_without_the_option_is_refused(decay, monkeypatch):
    """-inf in g without options.resets: every entry point refuses it, naming g, the -inf and the option (on CPU
    tensors always; on CUDA under the opt-in checks), rather than return the finite-gate arithmetic's NaN."""
    if CUDA:
        monkeypatch.setenv("LONGSCAN_CHECKS", "1")
    x = reset_inputs(decay, (5,), seed=12, keys=slice(0, 1))   # heads 0 and 1 at token 5, one key each
    q, k, v, g, P = (x[n].float().to(DEV) for n in ("q", "k", "v", "g", "initial_state"))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    opts = small(2, resets=False)
    calls = {"forward": lambda: tc.forward(q, k, v, g, options=opts),
             "backward": lambda: tc.backward(q, k, v, g, None, None, None, do, None, options=opts),
             "segment_state": lambda: tc.segment_state(k, v, g, options=opts),
             "prefix_grad": lambda: tc.prefix_grad(q, g, None, None, do, options=opts),
             "add_prefix": lambda: tc.add_prefix(do, q, g, None, None, P, options=opts)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=REFUSED):
            call()
    # through the one-device entry point too, and accepted with the option
    from longscan.kernels.linear_attention import chunk_linear_attention
    with pytest.raises(ValueError, match=REFUSED):
        chunk_linear_attention(q, k, v, g, backend="triton", options=opts)
    o, _ = chunk_linear_attention(q, k, v, g, backend="triton", options=small(2))
    assert torch.isfinite(o).all()


def _all_results(x, options, scale=16 ** -0.5):
    """Everything the backend computes for x: forward (o, final state), backward, and the SP pieces
    (segment_state, add_prefix, prefix_grad) of the same inputs."""
    q, k, v, g, h0 = (x[n].float().to(DEV) for n in ("q", "k", "v", "g", "initial_state"))
    gen = torch.Generator().manual_seed(21)
    do = torch.randn(q.shape[:3] + v.shape[-1:], generator=gen).to(DEV)
    dht = torch.randn(h0.shape, generator=gen).to(DEV)
    o, ht, saved = tc.forward(q, k, v, g, None, scale, h0, True, return_saved=True, options=options)
    grads = tc.backward(q, k, v, g, None, scale, h0, do, dht, kv_states=saved, options=options)
    S, logd = tc.segment_state(k, v, g, options=options)
    o1 = tc.add_prefix(o, q, g, None, scale, h0, options=options)
    dP = tc.prefix_grad(q, g, None, scale, do, options=options)
    return dict(zip(["o", "ht", "dq", "dk", "dv", "dg", "dh0", "S", "logd", "add_prefix", "dP"],
                    [o, ht, *grads, S, logd, o1, dP]))


@pytest.mark.parametrize("segments", [None, 2])
@pytest.mark.parametrize("decay", ["g_scalar", "g_per_key", "g_per_key_steep"])
def test_option_on_with_finite_gates_changes_nothing(decay, segments):
    """options.resets on with finite gates: the reset arithmetic gives the finite-gate kernels' results (to
    round-off), forward, backward and the SP pieces; per key also where a key falls past the levels' span (the
    levels kernel: per marked chunk with resets, per marked segment without)."""
    x = make_inputs(decay.replace("_steep", ""), 1, T, 2, 16, 16, torch.float64, seed=13)
    if decay.endswith("steep"):
        x["g"][:, 3, :, 0], x["g"][:, 20, :, 5] = -90.0, -130.0
    off = _all_results(x, small(segments, resets=False))
    on = _all_results(x, small(segments, resets=True))
    for name, want in off.items():
        assert torch.isfinite(want).all(), name
        assert rel_err(on[name].cpu().double(), want.cpu().double()) <= 1e-5, name


# -- GPU: the default chunks and launch settings, bf16 and float32 ----------------------------------------------------

GPU_POSITIONS = (0, 63, 64, 100, 101, 150, 299)   # the first token, both sides of a chunk edge, two adjacent, the last


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("segments", [None, 4])
@pytest.mark.parametrize("decay", ["g_scalar", "g_per_key"])
def test_gpu_resets(decay, segments, dtype, tol):
    x = reset_inputs(decay, GPU_POSITIONS, seed=3, T=300, H=3, K=64, V=64)
    check(x, True, LinearKernelOptions(segments=segments, resets=True), dtype=dtype, tol=tol, seed=3)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_per_key_resets_on_some_keys_in_steep_chunks(dtype):
    """-inf on some keys, beside gates that fall past the levels' span, at head dims 128 (float16: run in bf16)."""
    x = reset_inputs("g_per_key", GPU_POSITIONS, seed=4, T=300, H=2, K=128, V=128, keys=slice(5, 70))
    x["g"][:, 70, :, :8] = -150.0
    check(x, True, LinearKernelOptions(resets=True), dtype=dtype, tol=1e-2, seed=4)


# -- 5. packed documents through the Triton kernels under SP --------------------------------------------------------

SP_T_LOCAL = 32   # two chunks of 16 a rank; zigzag pieces of 16 (rank 0: tokens 0-15 and 48-63)
SP_DOCS = {
    # across the contiguous rank edge (32) and the zigzag piece edges (32, 48); a one-token document
    "crossing": [0, 3, 20, 50, 51, 64],
    # ending exactly on the rank edge (32) and on piece edges (32, 48); one across the piece edge 16
    "on_edges": [0, 5, 32, 48, 64],
}
SP_DECAYS = ("g_scalar", "g_per_key")
# (decay, method, layout): every method, ZeCO in both layouts, each decay kind in both; LASP-2 with overlap=True
# (the output pass from zero, then add_prefix)
SP_RUNS = (("g_scalar", "zeco", "contiguous"), ("g_per_key", "zeco", "zigzag"), ("g_scalar", "lasp2", "zigzag"),
           ("g_per_key", "lasp1", "contiguous"))


def _sp_worker(rank, world):
    from longscan.parallel import linear_attention, shard
    out = {}
    for decay in SP_DECAYS:
        x = make_inputs(decay, 1, SP_T_LOCAL * world, 2, 16, 16, torch.float64, seed=SP_DECAYS.index(decay))
        do = torch.randn(1, SP_T_LOCAL * world, 2, 16, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
        for docs, cu in SP_DOCS.items():
            # the reference: each document alone through the float64 recurrence on one device
            leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "g")}
            o_ref = torch.cat([naive_recurrent_linear_attention(*(leaves[n][:, a:b] for n in ("q", "k", "v", "g")))[0]
                               for a, b in zip(cu[:-1], cu[1:])], 1)
            ref = dict(zip(("dq", "dk", "dv", "dg"), torch.autograd.grad(o_ref, list(leaves.values()), do)))
            for method, layout in [(m, lay) for d, m, lay in SP_RUNS if d == decay]:
                def sh(t):
                    return shard(t, 1, None, layout)
                local = {n: sh(x[n]).float().requires_grad_() for n in ("q", "k", "v", "g")}
                o, _ = linear_attention(*local.values(), method=method, layout=layout, backend="triton",
                                        n_blocks=2, overlap=method == "lasp2", options=small(resets=False),
                                        cu_seqlens=torch.tensor(cu))
                grads = torch.autograd.grad(o, list(local.values()), sh(do).float())
                finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(d).all()) for d in grads)
                errs = {"o": rel_err(o, sh(o_ref))}
                errs.update({name: rel_err(d, sh(ref[name])) for name, d in zip(ref, grads)})
                out[(decay, docs, layout, method)] = (errs, finite)
    return out


@pytest.fixture(scope="module")
def sp_results():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU processes run the Triton kernels in the interpreter only (TRITON_INTERPRET=1)")
    from harness import run_distributed
    return run_distributed(_sp_worker, 2)


@pytest.mark.parametrize("decay,method,layout", SP_RUNS, ids=["-".join(r) for r in SP_RUNS])
@pytest.mark.parametrize("docs", list(SP_DOCS))
def test_documents_through_triton_under_sp(sp_results, docs, decay, method, layout):
    """cu_seqlens with backend='triton' at W = 2: output and the gradients of q, k, v, g on every rank against
    each document run alone through the float64 recurrence."""
    for rank in range(2):
        errs, finite = sp_results[rank][(decay, docs, layout, method)]
        assert finite, f"rank {rank}: non-finite results"
        bad = {k: v for k, v in errs.items() if not v <= 1e-4}
        assert not bad, f"rank {rank}: {bad}"
