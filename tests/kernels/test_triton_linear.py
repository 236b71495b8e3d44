"""Triton chunked linear attention against the float64 recurrent reference.

CPU: the Triton interpreter in float32 (tiny shapes, chunks of 16 so odd lengths span several chunks and
the segment-parallel path is exercised with the number of segments forced through LinearKernelOptions).
GPU (skipped without CUDA): bf16 and float32.
"""
import dataclasses

import pytest
import torch

from harness import rel_err
from linear_cases import DECAYS, make_inputs

triton = pytest.importorskip("triton")

from longscan.kernels.linear_attention import (chunk_linear_attention, naive_recurrent_linear_attention,  # noqa: E402
                                               torch_chunk)
from longscan.kernels import trace  # noqa: E402
from longscan.kernels.linear_attention import LinearKernelOptions  # noqa: E402
from longscan.kernels.linear_attention import triton as tc  # noqa: E402
from longscan.kernels.linear_attention.triton import plan  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


SMALL = LinearKernelOptions(chunk=16, chunk_per_key=16)


def small(segments=None, tiles=False):
    """Options with chunks of 16 tokens (the interpreter is slow; shapes stay tiny but cross chunk boundaries),
    ``segments`` forced (None: the plan's choice) and with tiles: every kernel at 16 keys / values."""
    opts = dataclasses.replace(SMALL, segments=segments)
    return opts.with_blocks(16) if tiles else opts


def reference(x, with_state, do, dht):
    """o, final state and every gradient in float64 through the recurrent reference (dh0 also without h0)."""
    leaves = {n: (t.double().clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    if not with_state:
        leaves["initial_state"] = torch.zeros_like(leaves["initial_state"]).requires_grad_()
    o, s = naive_recurrent_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"],
                                            leaves["g_gamma"], None, leaves["initial_state"], True)
    outs, grads = [o], [do.double()]
    if dht is not None:
        outs.append(s)
        grads.append(dht.double())
    gate = leaves["g"] if leaves["g"] is not None else leaves["g_gamma"]
    names = [leaves[n] for n in ("q", "k", "v", "initial_state")] + ([gate] if gate is not None else [])
    res = torch.autograd.grad(outs, names, grads)
    dq, dk, dv, dh0 = res[:4]
    return o, s, (dq, dk, dv, res[4] if gate is not None else None, dh0)


def _to(x, device, dtype):
    return {n: (t.to(device=device, dtype=dtype if n != "initial_state" else torch.float32)
                if t is not None else None) for n, t in x.items()}


def check_forward_backward(decay, B, T, H, K, V, dtype, tol, with_state, with_dht, seed, need_dg=True,
                           reuse=False, edit=None, options=None, dg_tol=None, rounded_reference=False):
    """Forward and backward against the reference; reuse: the backward gets the forward's ForwardRecord
    (as the autograd op runs them), which are returned; edit: changes the float64 inputs in place first;
    rounded_reference: the reference sees the inputs as rounded to the kernel's dtypes, and its dg is rounded
    to dg's dtype (the error is then the kernel's arithmetic alone)."""
    x = make_inputs(decay, B, T, H, K, V, torch.float64, seed=seed)
    if edit is not None:
        edit(x)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) if with_dht else None
    if rounded_reference:
        x = {n: t.to(dtype if n != "initial_state" else torch.float32).double() if t is not None else None
             for n, t in x.items()}
        do = do.to(dtype).double()
        dht = dht.float().double() if dht is not None else None
    o_ref, s_ref, g_ref = reference(x, with_state, do, dht)

    y = _to(x, DEV, dtype)
    h0 = y["initial_state"] if with_state else None
    o, ht, *saved = tc.forward(y["q"], y["k"], y["v"], y["g"], y["g_gamma"], None, h0, True, return_saved=reuse,
                               options=options)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert ht.dtype == torch.float32 and ht.shape == (B, H, K, V)
    assert rel_err(o.cpu(), o_ref) <= tol
    assert rel_err(ht.cpu(), s_ref) <= tol

    grads = tc.backward(y["q"], y["k"], y["v"], y["g"], y["g_gamma"], None, h0, do.to(DEV, dtype),
                        dht.to(DEV, torch.float32) if dht is not None else None, need_dg,
                        kv_states=saved[0] if reuse else None, options=options)
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dh0"), grads, g_ref):
        if want is None or (name == "dg" and not need_dg):
            assert got is None, name
            continue
        assert got.shape == want.shape, name
        if name == "dh0":
            assert got.dtype == torch.float32
        if rounded_reference and name == "dg":
            want = want.to(got.dtype).double()   # dg comes back in the gate's dtype: rounded once, as here
        err = rel_err(got.cpu(), want)
        bar = dg_tol if name == "dg" and dg_tol is not None else tol
        assert err <= bar, f"{name}: rel err {err:.2e}"
    return saved[0] if reuse else None


@pytest.mark.parametrize("segments", [None, 3])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("T", [37, 64])            # 37: not a multiple of the chunk
@pytest.mark.parametrize("decay", DECAYS)
def test_forward_backward_interpreter(decay, T, with_state, segments):
    check_forward_backward(decay, 2, T, 2, 16, 32, torch.float32, 1e-4, with_state, with_dht=True,
                           seed=T + 7 * len(decay), options=small(segments))


@pytest.mark.parametrize("decay", DECAYS)
def test_several_tiles_per_head(decay):
    """Tiles of 16 keys / values, so every kernel splits K=V=32 over two programs (the GPU's tiling)."""
    check_forward_backward(decay, 1, 45, 2, 32, 32, torch.float32, 1e-4, True, with_dht=True, seed=21,
                           options=small(2, tiles=True))


@pytest.mark.parametrize("decay", DECAYS)
def test_without_dht_and_single_token(decay):
    check_forward_backward(decay, 1, 1, 2, 16, 16, torch.float32, 1e-4, True, with_dht=False, seed=3, options=SMALL)
    check_forward_backward(decay, 1, 21, 1, 32, 16, torch.float32, 1e-4, False, with_dht=False, seed=4,
                           options=SMALL)


@pytest.mark.parametrize("segments", [None, 3])
def test_g_gamma_gradient_through_public_op(segments):
    """A learnable g_gamma on the Triton backend: its gradient against float64 and the torch backend."""
    x = make_inputs("g_gamma", 2, 45, 3, 16, 32, torch.float64, seed=11)
    gen = torch.Generator().manual_seed(12)
    do = torch.randn(2, 45, 3, 32, generator=gen, dtype=torch.float64)
    grads = {}
    for backend, dtype in (("naive", torch.float64), ("torch", torch.float32), ("triton", torch.float32)):
        y = {n: (t.to(DEV, dtype).clone().requires_grad_() if t is not None else None) for n, t in x.items()}
        o, _ = chunk_linear_attention(y["q"], y["k"], y["v"], g_gamma=y["g_gamma"], initial_state=y["initial_state"],
                                      backend=backend, options=small(segments) if backend == "triton" else None)
        (o * do.to(DEV, dtype)).sum().backward()
        grads[backend] = y["g_gamma"].grad.cpu().double()
    assert rel_err(grads["triton"], grads["naive"]) <= 1e-5
    assert rel_err(grads["triton"], grads["torch"]) <= 1e-5


@pytest.mark.parametrize("decay", ["g_gamma", "g_scalar", "g_per_key"])
@pytest.mark.parametrize("T", [1, 21])
def test_first_token_gate_gradient_without_initial_state(decay, T):
    """Without an initial state the first token's gate multiplies a zero state: its gradient is exactly 0 (one
    token: every dg), not the round-off of cancelling terms (large inputs make those terms large)."""
    x = make_inputs(decay, 2, T, 2, 16, 16, torch.float32, seed=T)
    for n in ("q", "k", "v"):
        x[n] = x[n] * 30
    do = torch.randn(2, T, 2, 16, generator=torch.Generator().manual_seed(5)) * 30
    y = _to(x, DEV, torch.float32)
    dht = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(6)).to(DEV)
    dg = tc.backward(y["q"], y["k"], y["v"], y["g"], y["g_gamma"], None, None, do.to(DEV), dht, True,
                     options=SMALL)[3].cpu()
    if decay == "g_gamma":
        if T == 1:
            assert dg.abs().max() <= 1e-6
        return
    assert dg[:, 0].abs().max() <= 1e-6
    if T > 1:   # the others are not zero, and match the float64 reference
        x64 = {n: (t.double() if t is not None else None) for n, t in x.items()}
        x64["initial_state"] = torch.zeros_like(x64["initial_state"])
        want = reference(x64, False, do.double(), dht.cpu().double())[2][3]
        assert rel_err(dg, want) <= 1e-4


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("decay", DECAYS)
def test_sp_pieces_match_torch(decay, segments):
    """segment_state, add_prefix and prefix_grad against torch_chunk's (float64) on an odd length."""
    opts = small(segments)
    B, T, H, K, V = 1, 53, 2, 16, 32
    x = make_inputs(decay, B, T, H, K, V, torch.float64, seed=11)
    gen = torch.Generator().manual_seed(12)
    o = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    P = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    y = _to(x, DEV, torch.float32)
    S, a = tc.segment_state(y["k"], y["v"], y["g"], y["g_gamma"], options=opts)
    S_ref, a_ref = torch_chunk.segment_state(x["k"], x["v"], x["g"], x["g_gamma"])
    assert S.dtype == torch.float32 and a.shape == (B, H, K)
    assert rel_err(S.cpu(), S_ref) <= 1e-4
    assert (a.cpu().double() - a_ref).abs().max() <= 1e-4 * (1 + a_ref.abs().max())
    out = tc.add_prefix(o.to(DEV, torch.float32), y["q"], y["g"], y["g_gamma"], 0.3, P.to(DEV, torch.float32),
                        options=opts)
    assert rel_err(out.cpu(), torch_chunk.add_prefix(o, x["q"], x["g"], x["g_gamma"], 0.3, P)) <= 1e-4
    pg = tc.prefix_grad(y["q"], y["g"], y["g_gamma"], 0.3, do.to(DEV, torch.float32), options=opts)
    assert rel_err(pg.cpu(), torch_chunk.prefix_grad(x["q"], x["g"], x["g_gamma"], 0.3, do)) <= 1e-4
    # with return_saved, its states' totals (one segment too) are the segment's total log gate (SP sums them)
    pg2, qdo = tc.prefix_grad(y["q"], y["g"], y["g_gamma"], 0.3, do.to(DEV, torch.float32), return_saved=True,
                              options=opts)
    assert torch.equal(pg2, pg) and (qdo.n > 1) == (segments > 1)
    total = qdo.log_decays.sum(2).cpu().double()
    assert (total - a_ref).abs().max() <= 1e-4 * (1 + a_ref.abs().max())


@pytest.mark.parametrize("decay", DECAYS[1:])
def test_backward_without_gate_gradient(decay):
    """need_dg=False: dg is None and every other gradient is unchanged: to the bit under the interpreter, which runs
    the same float operations either way; to 1e-5 on a GPU, where the two are different compiled kernels (the scalar
    gates' dq and dk kernels with and without the gate partials), whose contractions into fused multiply-adds may
    round differently."""
    x = _to(make_inputs(decay, 1, 37, 2, 16, 16, torch.float64, seed=8), DEV, torch.float32)
    gen = torch.Generator().manual_seed(9)
    do = torch.randn(1, 37, 2, 16, generator=gen).to(DEV)
    args = (x["q"], x["k"], x["v"], x["g"], x["g_gamma"], None, x["initial_state"], do, None)
    full = tc.backward(*args, options=SMALL)
    part = tc.backward(*args, need_dg=False, options=SMALL)
    assert full[3] is not None and part[3] is None
    for a, b in zip(full[:3] + full[4:], part[:3] + part[4:]):
        assert rel_err(a.cpu(), b.cpu()) <= 1e-5 if CUDA else torch.equal(a, b)


@pytest.mark.parametrize("decay", DECAYS)
def test_backward_reuses_forward_segment_states(decay):
    """forward(return_saved=True) hands the backward its segment prefixes (a ForwardRecord): the same gradients as a
    backward that recomputes them, and through autograd the float64 reference's."""
    opts = small(3)
    x = _to(make_inputs(decay, 1, 70, 2, 16, 16, torch.float64, seed=13), DEV, torch.float32)
    gen = torch.Generator().manual_seed(14)
    do = torch.randn(1, 70, 2, 16, generator=gen).to(DEV)
    args = (x["q"], x["k"], x["v"], x["g"], x["g_gamma"], None, x["initial_state"])
    o, _, saved = tc.forward(*args, False, return_saved=True, options=opts)
    assert saved is not None and saved.n == 3
    with_saved = tc.backward(*args, do, None, kv_states=saved, options=opts)
    recomputed = tc.backward(*args, do, None, options=opts)
    for a, b in zip(with_saved, recomputed):
        assert (a is None and b is None) or rel_err(a.cpu(), b.cpu()) <= 1e-6
    # and the backward really reads them: other prefixes give another dq
    other = dataclasses.replace(saved, prefixes=saved.prefixes + 1.0)
    assert rel_err(tc.backward(*args, do, None, kv_states=other, options=opts)[0].cpu(), recomputed[0].cpu()) > 1e-3


@pytest.mark.parametrize("segments", [None, 3])
def test_backward_reuses_forward_gate_operands(segments):
    """Per-key gates: forward(return_saved=True) keeps its decayed operands and the backward's factors, and the
    backward reads them in place of its own pre-pass (same gradients; changed factors change dq and dk);
    with keep_gate_operands off it keeps none."""
    opts = small(segments)
    x = _to(make_inputs("g_per_key", 1, 40, 2, 16, 16, torch.float64, seed=15), DEV, torch.float32)
    do = torch.randn(1, 40, 2, 16, generator=torch.Generator().manual_seed(16)).to(DEV)
    args = (x["q"], x["k"], x["v"], x["g"], None, None, x["initial_state"])
    _, _, saved = tc.forward(*args, False, return_saved=True, options=opts)
    assert saved is not None and saved.operands is not None and saved.operands.complete
    assert saved.n == (segments or 1)
    with trace.record() as events:
        with_saved = tc.backward(*args, do, None, kv_states=saved, options=opts)
        assert trace.names(events, "gate_operands") == []
        recomputed = tc.backward(*args, do, None, options=opts)
    assert len(trace.names(events, "gate_operands")) == 1
    for a, b in zip(with_saved, recomputed):
        assert rel_err(a.cpu(), b.cpu()) <= 1e-6
    ops = dataclasses.replace(saved.operands, eq=saved.operands.eq * 2, ek=saved.operands.ek * 2)
    dq, dk = tc.backward(*args, do, None, kv_states=dataclasses.replace(saved, operands=ops), options=opts)[:2]
    assert rel_err(dq.cpu(), recomputed[0].cpu()) > 0.1 and rel_err(dk.cpu(), recomputed[1].cpu()) > 1e-2
    saved = tc.forward(*args, False, return_saved=True,
                       options=dataclasses.replace(opts, keep_gate_operands=False))[2]
    assert (saved is None) if segments is None else (saved.operands is None)


@pytest.mark.parametrize("factors", [False, True])
@pytest.mark.parametrize("segments", [None, 3])
def test_forward_takes_segment_state_query_operands(segments, factors):
    """Per-key gates: segment_state(..., q=q) has its pre-pass write the queries' operands too (and with
    factors the backward's): the forward given them runs no pre-pass and gives the plain forward's output,
    and a backward from its saved operands the plain gradients. Without factors the forward that keeps its
    operands writes them all again (the backward needs the factors)."""
    opts = small(segments)
    x = _to(make_inputs("g_per_key", 1, 40, 2, 16, 16, torch.float64, seed=17), DEV, torch.float32)
    q, k, v, g = x["q"], x["k"], x["v"], x["g"]
    do = torch.randn(1, 40, 2, 16, generator=torch.Generator().manual_seed(18)).to(DEV)
    o_plain, _ = tc.forward(q, k, v, g, options=opts)
    _, _, kv = tc.segment_state(k, v, g, return_saved=True, q=q, factors=factors, options=opts)
    assert kv.operands.qd is not None and kv.operands.kd is not None and kv.operands.complete == factors
    with trace.record() as events:
        o, _, saved = tc.forward(q, k, v, g, kv_states=kv, return_saved=True, options=opts)
        assert len(trace.names(events, "gate_operands")) == (0 if factors else 1)
        assert rel_err(o.cpu(), o_plain.cpu()) <= 1e-6
        grads = tc.backward(q, k, v, g, None, None, None, do, None, kv_states=saved, options=opts)
        assert len(trace.names(events, "gate_operands")) == (0 if factors else 1)
    for a, b in zip(grads, tc.backward(q, k, v, g, None, None, None, do, None, options=opts)):
        assert rel_err(a.cpu(), b.cpu()) <= 1e-6
    with pytest.raises(ValueError, match="q must have k's shape"):
        tc.segment_state(k, v, g, return_saved=True, q=q[:, :5], options=opts)


def test_kept_operands_are_freed_by_activation_checkpointing(monkeypatch):
    """The autograd op keeps the forward's gate operands as saved tensors: under torch.utils.checkpoint they
    are gone after the forward (the recomputed forward makes them again) and the gradients are unchanged."""
    import gc
    import weakref
    x = make_inputs("g_per_key", 1, 40, 2, 16, 16, torch.float32, seed=19)
    refs = []
    forward = tc.TritonBackend.forward

    def watched(self, *args, **kwargs):   # the backend's public forward, watched for what it keeps
        out = forward(self, *args, **kwargs)
        if kwargs.get("keep") and len(refs) == 0:   # the first forward, not the recomputed one
            ops = out[2].operands
            refs.extend(weakref.ref(t) for t in (ops.qd, ops.kd, ops.eq, ops.ek, out[2].prefixes))
        return out
    monkeypatch.setattr(tc.TritonBackend, "forward", watched)

    def loss(leaves):
        return chunk_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"], backend="triton",
                                      options=small(2))[0].square().sum()
    grads = {}
    for ckpt in (False, True):
        refs.clear()
        leaves = {n: x[n].to(DEV).clone().requires_grad_() for n in ("q", "k", "v", "g")}
        out = torch.utils.checkpoint.checkpoint(loss, leaves, use_reentrant=False) if ckpt else loss(leaves)
        gc.collect()
        assert len(refs) == 5 and all((r() is None) == ckpt for r in refs), ckpt
        out.backward()
        grads[ckpt] = [leaves[n].grad for n in ("q", "k", "v", "g")]
    for a, b in zip(grads[True], grads[False]):
        assert rel_err(a.cpu(), b.cpu()) <= 1e-6


def test_autograd_op_keeps_nothing_without_gradients():
    """The autograd op asks the forward for what its backward reuses only when a backward will come."""
    x = make_inputs("g_per_key", 1, 20, 1, 16, 16, torch.float32, seed=3)
    q, k, v, g = (x[n].to(DEV) for n in ("q", "k", "v", "g"))
    with trace.record() as events:
        chunk_linear_attention(q, k, v, g, backend="triton", options=SMALL)
        chunk_linear_attention(q, k, v, g.requires_grad_(), backend="triton", options=SMALL)
    assert [e.info["return_saved"] for e in events if e.name == "forward"] == [False, True]


@pytest.mark.parametrize("segments", [None, 3])
@pytest.mark.parametrize("decay", DECAYS)
def test_backward_takes_dht_late(decay, segments):
    """dht as a function: called once the dq kernel has been launched (SP's reverse collective runs beside
    that kernel), and the same gradients as with dht given up front."""
    opts = small(segments)
    x = _to(make_inputs(decay, 1, 45, 2, 16, 16, torch.float64, seed=17), DEV, torch.float32)
    gen = torch.Generator().manual_seed(18)
    do = torch.randn(1, 45, 2, 16, generator=gen).to(DEV)
    dht = torch.randn(1, 2, 16, 16, generator=gen).to(DEV)
    args = (x["q"], x["k"], x["v"], x["g"], x["g_gamma"], None, x["initial_state"], do)
    with trace.record() as events:
        def late():
            trace.emit("dht")
            return dht
        eager = tc.backward(*args, dht, options=opts)
        got = tc.backward(*args, late, options=opts)
    assert [e for e in trace.names(events) if e in ("bwd_dq", "dht")] == ["bwd_dq", "bwd_dq", "dht"]
    for a, b in zip(got, eager):
        assert (a is None and b is None) or torch.equal(a, b)
    # a late None: as no final-state gradient at all
    for a, b in zip(tc.backward(*args, lambda: None, options=opts), tc.backward(*args, None, options=opts)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_forward_takes_segment_states_zero_prefixes():
    """segment_state(return_saved=True, keep_prefixes=True) keeps its scan's prefixes from zero: a forward
    without an initial state starts its segments from them (no scan of its own, as SP's zero-prefix pass
    runs); given an initial state, the forward and the backward scan from it instead."""
    opts = small(3)
    x = _to(make_inputs("g_per_key", 1, 70, 2, 16, 16, torch.float64, seed=21), DEV, torch.float32)
    q, k, v, g, h0 = x["q"], x["k"], x["v"], x["g"], x["initial_state"]
    do = torch.randn(1, 70, 2, 16, generator=torch.Generator().manual_seed(22)).to(DEV)
    S, _, kv = tc.segment_state(k, v, g, return_saved=True, keep_prefixes=True, options=opts)
    assert kv.zero_prefixes is not None and kv.n == 3
    assert tc.segment_state(k, v, g, return_saved=True, options=opts)[2].zero_prefixes is None   # kept only when asked
    o_plain, _ = tc.forward(q, k, v, g, options=opts)
    assert rel_err(tc.forward(q, k, v, g, kv_states=kv, options=opts)[0].cpu(), o_plain.cpu()) <= 1e-6
    # the zero-prefix forward really reads them
    moved = dataclasses.replace(kv, zero_prefixes=kv.zero_prefixes + 1.0)
    assert rel_err(tc.forward(q, k, v, g, kv_states=moved, options=opts)[0].cpu(), o_plain.cpu()) > 1e-3
    # with an initial state they are not this sequence's prefixes: forward and backward scan from h0
    o_h0, ht = tc.forward(q, k, v, g, None, None, h0, True, options=opts)
    o_kv, ht_kv = tc.forward(q, k, v, g, None, None, h0, True, kv_states=moved, options=opts)
    assert rel_err(o_kv.cpu(), o_h0.cpu()) <= 1e-6 and rel_err(ht_kv.cpu(), ht.cpu()) <= 1e-6
    grads = tc.backward(q, k, v, g, None, None, h0, do, None, options=opts)
    for a, b in zip(tc.backward(q, k, v, g, None, None, h0, do, None, kv_states=moved, options=opts), grads):
        assert rel_err(a.cpu(), b.cpu()) <= 1e-6


def steep_gates(x, start=0):
    """Per-key log gates that fall far past float32's exp range inside one chunk, from token start on: -7 a
    token on key 0 (level boundaries mid-chunk), -100 on key 1 (every token its own level), -30 on key 2, a
    -300 step at token start + 5 on key 3, and -4.5 on key 4 (a chunk of 16 falls to -72, just past the -60 below
    which the levels take the main kernels' level-0 factor back); the other keys (and every key before start) keep
    mild gates."""
    g = x["g"][:, start:]
    g[..., 0], g[..., 1], g[..., 2], g[..., 4] = -7.0, -100.0, -30.0, -4.5
    g[:, 5, :, 3] = -300.0


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("start", [0, 32])
@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("segments", [None, 2])
def test_per_key_gates_that_fall_steeply(segments, tiles, start, reuse):
    """Gates whose chunk sums reach -1600: every kernel stays finite and matches float64 (the levels of the
    per-key factorisation; a single exp(b)·exp(-b) factorisation gives NaN here). start=32: only the second
    of two segments (tokens 32..44) is steep, so the first is left alone. reuse: the backward reads the
    forward's gate operands and steep marks (as the autograd op runs it)."""
    # tiles: K-tiles of 16 keys, the levels are found per tile
    saved = check_forward_backward("g_per_key", 1, 45, 2, 32, 16, torch.float32, 1e-4, True, with_dht=True,
                                   seed=31, reuse=reuse, edit=lambda x: steep_gates(x, start),
                                   options=small(segments, tiles))
    assert not reuse or saved.operands.complete


def test_sp_decomposition_equals_whole():
    """Two segments through the SP pieces give the whole-sequence forward (the identity SP relies on)."""
    B, T, H, K, V = 1, 50, 2, 16, 16
    x = _to(make_inputs("g_scalar", B, T, H, K, V, torch.float64, seed=5), DEV, torch.float32)
    q, k, v, g, h0 = x["q"], x["k"], x["v"], x["g"], x["initial_state"]
    o_all, _ = tc.forward(q, k, v, g, None, None, h0, False, options=SMALL)
    c = 29
    o1, _ = tc.forward(q[:, :c], k[:, :c], v[:, :c], g[:, :c], None, None, h0, False, options=SMALL)
    S1, a1 = tc.segment_state(k[:, :c], v[:, :c], g[:, :c], options=SMALL)
    P = a1.exp().unsqueeze(-1) * h0 + S1
    o2, _ = tc.forward(q[:, c:], k[:, c:], v[:, c:], g[:, c:], None, None, None, False, options=SMALL)
    o2 = tc.add_prefix(o2, q[:, c:], g[:, c:], None, K ** -0.5, P, options=SMALL)
    assert rel_err(torch.cat([o1, o2], 1).cpu(), o_all.cpu()) <= 1e-5


@pytest.mark.parametrize("segments", [None, 3])
def test_public_op_autograd(segments):
    """chunk_linear_attention(backend="triton") with autograd against the torch backend (with 3 segments
    the backward reuses the forward's segment states)."""
    x = make_inputs("g_per_key", 1, 40, 2, 16, 16, torch.float32, seed=9)
    outs = {}
    for backend in ("triton", "torch"):
        leaves = {n: (t.to(DEV).clone().requires_grad_() if t is not None else None) for n, t in x.items()}
        o, s = chunk_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"], None,
                                      initial_state=leaves["initial_state"], output_final_state=True,
                                      backend=backend, options=small(segments))
        (o.square().sum() + s.sum()).backward()
        outs[backend] = [o, s] + [leaves[n].grad for n in ("q", "k", "v", "g", "initial_state")]
    for a, b in zip(outs["triton"], outs["torch"]):
        assert rel_err(a.detach().cpu(), b.detach().cpu()) <= 1e-4


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the interpreter's bf16 (see the module docstring)
def test_float16_per_key_gates_run_in_bf16():
    """float16 with per-key gates overflowed (kn = k⊙exp(−b) leaves float16's range once a gate falls below
    about −11 inside a chunk: NaN); every entry point now runs them in bf16 and returns float16. The interpreter
    miscomputes bf16, so this checks the routing; test_gpu_per_key_float16 checks the numbers."""
    x = _to(make_inputs("g_per_key", 1, 20, 1, 16, 16, torch.float64, seed=4), DEV, torch.float16)
    q, k, v, g = x["q"], x["k"], x["v"], x["g"].float()
    for name, call, outs in (
            ("forward", lambda: tc.forward(q, k, v, g, options=SMALL), (0,)),
            ("backward", lambda: tc.backward(q, k, v, g, None, None, None, torch.ones_like(v), None, options=SMALL),
             (0, 1, 2)),
            ("segment_state", lambda: tc.segment_state(k, v, g, options=SMALL), ()),
            ("prefix_grad", lambda: tc.prefix_grad(q, g, None, None, torch.ones_like(v), options=SMALL), ())):
        with trace.record() as events:
            res = call()
        # the entry point's kernels ran on bf16 inputs
        assert [e.info["dtype"] for e in events if e.name == name] == [torch.bfloat16], name
        assert all(res[i].dtype == torch.float16 for i in outs), name
    # scalar gates keep float16 (their factors stay ≤ 1)
    with trace.record() as events:
        tc.forward(q, k, v, g[..., 0], options=SMALL)
    assert [e.info["dtype"] for e in events if e.name == "forward"] == [torch.float16]


def test_segment_plan_keeps_whole_waves():
    """A long sequence is cut into as many segments as keep at most programs_per_sm programs per SM, never one
    more (a last wave of few programs): 132 SMs, 32 programs a segment -> 16 segments (512 programs), not 17."""
    opts = LinearKernelOptions(num_sms=132)
    dev = torch.device("cpu")
    assert plan._segments(32, 1024, dev, opts) == 16
    assert plan._segments(64, 1024, dev, opts) == 8 and plan._segments(256, 1024, dev, opts) == 2
    for programs in (1, 3, 7, 32, 100, 263):
        ns = plan._segments(programs, 1 << 20, dev, opts)
        assert programs * ns <= opts.programs_per_sm * 132 < programs * (ns + 1)
    assert plan._segments(264, 1024, dev, opts) == 1             # split_below programs per SM: no split
    assert plan._segments(32, 40, dev, opts) == 40 // opts.min_segment_chunks   # no segment under min_segment_chunks


def test_clear_errors():
    q = torch.randn(1, 8, 1, 16, device=DEV)
    with pytest.raises(TypeError, match="supports"):
        tc.forward(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="head dims"):
        w = torch.randn(1, 8, 1, 24, device=DEV)
        tc.forward(w, w, w)
    if not CUDA and not plan._interpreting():
        with pytest.raises(ValueError, match="CUDA"):
            tc.forward(q, q, q)


# ---------------------------------------------------------------- GPU ----------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("decay", DECAYS)
def test_gpu_forward_backward(decay, dtype, tol):
    # the g_gamma gradient: test_gpu_g_gamma_gradient
    need_dg = decay != "g_gamma"
    for T, segments, reuse in ((1000, None, False), (777, 4, True)):   # reuse: as the autograd op runs it
        check_forward_backward(decay, 2, T, 3, 64, 64, dtype, tol, True, True, seed=T, need_dg=need_dg,
                               reuse=reuse, options=LinearKernelOptions(segments=segments))


@pytest.mark.parametrize("with_state", [False, True])
def test_g_gamma_gradient_in_float32_at_length(with_state):
    """A learnable g_gamma's gradient, a sum over every token, within 1e-5 of the float64 gradient at T = 1,000
    (float32): the per-token gate gradients summed lost 1e-4 of it there (gamma_grad.py says why)."""
    check_forward_backward("g_gamma", 1, 1000, 1, 64, 64, torch.float32, 1e-4, with_state, with_state, seed=3,
                           need_dg=True, dg_tol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype,tol,dg_tol", [(torch.bfloat16, 1e-2, 1e-3), (torch.float32, 1e-4, 1e-5)])
def test_gpu_g_gamma_gradient(dtype, tol, dg_tol):
    """A learnable g_gamma: the kernels in the inputs' dtype, its gradient in forward mode in float32 from the
    inputs as given, so against the float64 result on the same rounded inputs only float32 arithmetic is left.
    A bf16 g_gamma's gradient is bf16: the bar compares it with the reference rounded once to bf16 (rounding
    alone moves it by up to 2^-9)."""
    for T, segments, reuse in ((1000, None, False), (777, 4, True)):
        check_forward_backward("g_gamma", 2, T, 3, 64, 64, dtype, tol, True, True, seed=T, need_dg=True,
                               reuse=reuse, options=LinearKernelOptions(segments=segments), dg_tol=dg_tol,
                               rounded_reference=True)


@requires_cuda
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("decay", DECAYS)
def test_gpu_every_dtype_head_dim_128(decay, dtype, tol, with_state):
    """Every dtype at the largest head dims runs (float32 has its own dk / dv launch settings: shared memory)."""
    check_forward_backward(decay, 1, 300, 2, 128, 128, dtype, tol, with_state, with_state, seed=2)


def test_float32_gate_gradient_over_a_long_sequence():
    """float32, a scalar gate, T = 4,096 at K = V = 128: the accuracy grid's case, whose dg summed over the whole
    sequence in one segment (the CPU's plan; on a GPU, many sequences × heads) lost 2.2e-5 of dg. Segments of at
    most f32_gate_segment_chunks chunks restart those sums from a product of states (per-key gates too: their
    steep case 7.3e-6 -> 3.3e-6, docs/linear_kernels.md)."""
    from benchmarks import accuracy_linear as acc
    case = acc.Case("float32", "g", 4096, 1, 1, 128, 128, True)
    row = acc.measure(case, "triton", "none", torch.device(DEV), acc.seed_of(case, "full", 0))
    assert row["ours"]["dg"] <= 1e-5, row["ours"]


@pytest.mark.parametrize("decay", DECAYS)
def test_float32_products_tf32x3(decay):
    """float32 inputs with float32_products="tf32x3" (three tf32 products a dot on the GPU; the interpreter
    multiplies in float32 whatever the setting, so on CPU this checks that every kernel takes the option),
    per-key gates with steep chunks (the levels kernel), segments (the prefix pass)."""
    opts = LinearKernelOptions(float32_products="tf32x3", segments=3)
    check_forward_backward(decay, 1, 200, 2, 32, 32, torch.float32, 1e-4, True, True, seed=5, options=opts,
                           edit=(lambda x: x["g"].mul_(8)) if decay == "g_per_key" else None)


@requires_cuda
@pytest.mark.parametrize("decay", ["g_gamma", "g_scalar", "g_per_key"])
def test_gpu_single_token_gate_gradient_is_zero(decay):
    x = _to(make_inputs(decay, 1, 1, 4, 128, 128, torch.float64, seed=9), DEV, torch.bfloat16)
    do = torch.randn(1, 1, 4, 128, device=DEV, dtype=torch.bfloat16)
    dg = tc.backward(x["q"], x["k"], x["v"], x["g"], x["g_gamma"], None, None, do, None, True)[3]
    assert dg.abs().max().item() <= 1e-6


@requires_cuda
def test_gpu_per_key_float16():
    """float16 inputs with per-key gates (run in bf16): make_inputs' gates fall to about −20 inside a chunk of 64,
    past float16's range for exp(−b)."""
    check_forward_backward("g_per_key", 2, 1000, 3, 64, 64, torch.float16, 1e-2, True, True, seed=5)


@requires_cuda
@pytest.mark.parametrize("decay", DECAYS)
def test_gpu_head_dim_128_long(decay):
    """The benchmark head size, a long single sequence (segment-parallel path chosen automatically)."""
    check_forward_backward(decay, 1, 4100, 2, 128, 128, torch.bfloat16, 1e-2, True, True, seed=1,
                           need_dg=decay != "g_gamma", reuse=True)


def test_options_validate_themselves():
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        LinearKernelOptions(chunk=24)
    with pytest.raises(ValueError, match="segments must be None or a positive int"):
        LinearKernelOptions(segments=0)
    with pytest.raises(ValueError, match="float32_products must be 'ieee' or 'tf32x3', got 'tf32'"):
        LinearKernelOptions(float32_products="tf32")
    with pytest.raises(ValueError, match="unknown kernel 'fwdd'"):
        LinearKernelOptions(config_per_key={"fwdd": dict(block=64)})
    with pytest.raises(TypeError, match="options must be a LinearKernelOptions"):
        tc.forward(*(torch.randn(1, 8, 1, 16, device=DEV),) * 3, options={"chunk": 16})
    # the defaults are one value, equal to a fresh one
    assert LinearKernelOptions() == LinearKernelOptions(chunk=64, chunk_per_key=64)


@pytest.mark.parametrize("impl", ["kernel", "torch"])
@pytest.mark.parametrize("T,with_state", [(1, True), (64, False), (150, True), (0, True)])
def test_g_gamma_gradient_in_forward_mode(T, with_state, impl):
    """The g_gamma gradient's kernel and its torch form (float32 on CUDA) against autograd through the float64
    recurrence: one token, a whole chunk, a last chunk cut short, no token (a zero gradient); two blocks of V
    columns."""
    from longscan.kernels.linear_attention.triton import gamma_grad
    g_gamma_grad = gamma_grad.g_gamma_grad_kernel if impl == "kernel" else gamma_grad.g_gamma_grad_torch
    B, H, K, V, scale = 2, 3, 16, 64, 0.3
    x = make_inputs("g_gamma", B, max(T, 1), H, K, V, torch.float64, seed=T + 7)
    x = {n: (t[:, :T] if n in ("q", "k", "v") else t) for n, t in x.items()}
    gen = torch.Generator().manual_seed(T)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) if with_state else None
    h0 = x["initial_state"] if with_state else None
    f = {n: (t.to(DEV, torch.float32) if t is not None else None)
         for n, t in dict(q=x["q"], k=x["k"], v=x["v"], gamma=x["g_gamma"], h0=h0, do=do, dht=dht).items()}
    got = g_gamma_grad(f["q"], f["k"], f["v"], f["gamma"], scale, f["h0"], f["do"], f["dht"])
    assert got.dtype == torch.float32 and got.shape == (H,)
    if T == 0:
        assert not got.any()
        return
    gamma = x["g_gamma"].clone().requires_grad_()
    o, ht = naive_recurrent_linear_attention(x["q"], x["k"], x["v"], g_gamma=gamma, scale=scale, initial_state=h0,
                                             output_final_state=True)
    want = torch.autograd.grad([o, ht], gamma, [do, dht if dht is not None else torch.zeros_like(ht)])[0]
    assert rel_err(got.cpu().double(), want) <= 1e-5
    f["gamma"][0] = float("-inf")   # a head that forgets everything: gradient 0, the other heads' unchanged
    forgets = g_gamma_grad(f["q"], f["k"], f["v"], f["gamma"], scale, f["h0"], f["do"], f["dht"])
    assert forgets[0] == 0 and torch.equal(forgets[1:], g_gamma_grad(
        f["q"], f["k"], f["v"], x["g_gamma"].to(DEV, torch.float32), scale, f["h0"], f["do"], f["dht"])[1:])


def test_scalar_gate_gradient_restarts_at_segments():
    """A scalar gate's dg at token s sums every later token's term; with segments, each segment's sums restart
    from the value at the next segment's first token, taken from the states, so round-off gathers over one
    segment: at T = 8,000 in float32 within 1e-5 of float64 (summed over the whole sequence: 2.5e-5)."""
    B, T, H, K, V = 1, 8000, 2, 32, 32
    x = make_inputs("g_scalar", B, T, H, K, V, torch.float64, seed=T)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    g = x["g"].clone().requires_grad_()
    o, ht = chunk_linear_attention(x["q"], x["k"], x["v"], g=g, initial_state=x["initial_state"],
                                   output_final_state=True, backend="torch")
    want = torch.autograd.grad([o, ht], g, [do, dht])[0]
    y = {n: (t.to(DEV, torch.float32) if t is not None else None) for n, t in x.items()}
    got = tc.backward(y["q"], y["k"], y["v"], y["g"], None, None, y["initial_state"], do.to(DEV, torch.float32),
                      dht.to(DEV, torch.float32), True, options=LinearKernelOptions(segments=32))[3]
    assert rel_err(got.cpu().double(), want) <= 1e-5


@pytest.mark.parametrize("decay", ["g_scalar", "g_per_key"])
def test_first_token_gate_gradient_from_the_initial_state(decay):
    """The first token's gate multiplies the initial state: its dg is ⟨dh0, h0⟩. A small initial state beside
    large cancelling terms (T = 1, the final state's gradient): within 1e-6 in float32 (the q-side minus k-side
    sum it replaced: 1.4e-4 / 1.9e-4)."""
    B, T, H, K, V = 1, 1, 2, 32, 32
    x = make_inputs(decay, B, T, H, K, V, torch.float64, seed=4)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    h0 = x["initial_state"] * 1e-3
    g = x["g"].clone().requires_grad_()
    o, ht = naive_recurrent_linear_attention(x["q"], x["k"], x["v"], g=g, initial_state=h0, output_final_state=True)
    want = torch.autograd.grad([o, ht], g, [do, dht])[0]
    f = {n: t.to(DEV, torch.float32) for n, t in dict(q=x["q"], k=x["k"], v=x["v"], g=x["g"], h0=h0, do=do,
                                                      dht=dht).items()}
    got = tc.backward(f["q"], f["k"], f["v"], f["g"], None, None, f["h0"], f["do"], f["dht"], True)[3]
    assert rel_err(got.cpu().double(), want) <= 1e-6


def test_steep_per_key_final_state_in_float32():
    """Steep per-key gates (log gates down to about −7.4 a token): the final state is made of a chunk's last keys,
    whose decay factors exp(b_C − b_t) float32 inputs take as a reverse scan of the gates, not as the difference
    of the chunk's sum and its cumulative sum (which round apart by |b_C|·2⁻²⁴: 2.2e-6 here, ~1e-5 on an H100)."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, K, V = 1, 63, 1, 64, 64
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = -torch.exp(-3 + 5 * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64))
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    _, want = naive_recurrent_linear_attention(q, k, v, g=g, initial_state=h0, output_final_state=True)
    _, ht = tc.forward(*(x.to(DEV, torch.float32) for x in (q, k, v, g)), None, None, h0.to(DEV, torch.float32), True)
    assert rel_err(ht.cpu().double(), want) <= 5e-7
