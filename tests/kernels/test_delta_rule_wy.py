"""The delta rule's Triton path="wy" (chunks of 64, tensor-core products, 16×16 block inverse) against the
float64 recurrence: no gate, a scalar gate and per-key gates (KDA), forward and every gradient, with and
without states, a part of a chunk, exactly one, several with a padded last one, K ≠ V, steep gates; the
segment transitions (the scan without outputs) against the float64 chunked ones; the options' checks; the
default path="auto" (wy for bf16 inputs, float32 otherwise) and the kernels it reaches; its kernels compiled
for sm_90 at K = V = 128 in bf16 without register spills. CPU: the Triton interpreter in float32."""
import pytest
import torch

from delta_cases import (compare_final_state_gradients, compare_with_recurrence, float32_on, make_inputs,
                         run_with_grads as run)
from harness import TRITON_DIRS, assert_compiled_without_spills, rel_err

triton = pytest.importorskip("triton")

from longscan.kernels import trace  # noqa: E402
from longscan.kernels.delta_rule import naive_recurrent_delta_rule  # noqa: E402
from longscan.kernels.delta_rule import triton_chunk as tc  # noqa: E402
from longscan.kernels.delta_rule.triton import DeltaTritonOptions, wy_state  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
WY = DeltaTritonOptions(path="wy", block_v=16)
# (B, T, H, K, V): one token; a part of a chunk with K ≠ V; exactly one chunk; three with a padded last one
# and two blocks of V columns; K and V not powers of two
SHAPES = [(1, 1, 1, 16, 16), (2, 37, 1, 16, 32), (1, 64, 2, 32, 16), (1, 150, 2, 16, 32), (1, 70, 1, 24, 40)]


def compare(kind, shape, with_state, options, seed):
    # zero_atol: the gated dg of one token from no state is exactly 0; on a GPU its terms cancel to round-off
    compare_with_recurrence(lambda **a: tc.forward(**a, options=options), kind, shape, with_state, seed, DEV, 1e-5,
                            zero_atol=1e-5)


@pytest.mark.parametrize("with_state", [True, False], ids=["states", "no_states"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
@pytest.mark.parametrize("kind", ["deltanet", "gated"])
def test_wy_matches_recurrence(kind, shape, with_state):
    compare(kind, shape, with_state, WY, seed=shape[1] + (kind == "gated"))


# per-key gates: every shape above with states, one without, and K = 48 (two blocks of keys in every
# parallel kernel, the last one part masked)
KDA_CASES = [(shape, True) for shape in SHAPES] + [(SHAPES[3], False), ((1, 80, 2, 48, 16), True)]


@pytest.mark.parametrize("shape,with_state", KDA_CASES,
                         ids=lambda c: "B{}T{}H{}K{}V{}".format(*c) if isinstance(c, tuple) else
                         ("states" if c else "no_states"))
def test_wy_kda_matches_recurrence(shape, with_state):
    compare("kda", shape, with_state, WY, seed=shape[1] + 2)


# the scalar gate's serial backward forming K̄ and Q̃ in registers instead of scaling its products' rows
# (wy_gate_rows=False), and the parallel backward without its register cap (which the interpreter ignores)
WY_NO_ROWS = DeltaTritonOptions(path="wy", block_v=16, wy_gate_rows=False, wy_max_registers=None)


@pytest.mark.parametrize("with_state", [True, False], ids=["states", "no_states"])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
def test_wy_without_gate_rows_matches_recurrence(shape, with_state):
    """wy_gate_rows=False: the scalar gate's serial backward scales q and k instead of its products' rows."""
    assert WY.wy_gate_rows and WY.wy_max_registers == 128   # the defaults, run by every other test here
    compare("gated", shape, with_state, WY_NO_ROWS, seed=shape[1] + 7)


# the forward's parallel kernels wider than the backward's (W/U's loop over V and the output's blocks of columns)
WY_FWD_WIDE = DeltaTritonOptions(path="wy", block_v=16, wy_forward_block_v=32)


@pytest.mark.parametrize("kind", ["deltanet", "gated", "kda"])
def test_wy_forward_width_matches_recurrence(kind):
    compare(kind, SHAPES[3], True, WY_FWD_WIDE, seed=5)


@pytest.mark.parametrize("width", [32, 64])
@pytest.mark.parametrize("kind", ["deltanet", "gated", "kda"])
def test_wy_serial_widths_match_recurrence(kind, width):
    """The serial kernels at the widths a GPU launch picks (the interpreter's own choice is 16): V = 80 takes a
    full block of columns and a masked one at 32 or 64 a program."""
    compare(kind, (1, 100, 2, 16, 80), True, DeltaTritonOptions(path="wy", block_v=16, wy_state_block_v=width),
            seed=width + 1)


# the WY backward's dA from v and k (-Pᵀ (dU Yᵀ + dW Xᵀ) Pᵀ) instead of U and W; per-key gates keep U and W
WY_DA_INPUTS = DeltaTritonOptions(path="wy", block_v=16, wy_bwd_from_inputs=True)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[4]], ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
@pytest.mark.parametrize("kind", ["deltanet", "gated", "kda"])
def test_wy_bwd_from_inputs_matches_recurrence(kind, shape):
    compare(kind, shape, True, WY_DA_INPUTS, seed=shape[1] + 3)


def test_wy_gate_rows_segment_transitions_match_scaled_operands():
    """The segment transitions (no q: only K̄ dS's rows are scaled) with wy_gate_rows, against it off."""
    x = {n: (t.to(DEV) if t is not None else None)
         for n, t in make_inputs("gated", 1, 150, 2, 16, 16, torch.float32, seed=9).items()}
    gen = torch.Generator().manual_seed(9)
    dloc, dM = (torch.randn(1, 2, 16, 16, generator=gen).to(DEV) for _ in range(2))
    want, want_grads = transition_grads(lambda *a: tc.segment_transition(*a, options=WY_NO_ROWS), x, dloc, dM)
    got, got_grads = transition_grads(lambda *a: tc.segment_transition(*a, options=WY), x, dloc, dM)
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5
    for n in want_grads:
        assert rel_err(got_grads[n], want_grads[n]) < 1e-5, n


def test_wy_serial_passes_read_and_write_strided_states():
    """The serial passes address a state's block `[B, H, K, VB]` by strides: a V-major view (the relay's carries)
    and a state whose B and H do not merge (copied first) give the contiguous state's results bit for bit, the
    leaving state lands in a given ``out`` view, and an ``out`` of the wrong dtype or layout is refused."""
    from longscan.kernels.delta_rule.triton import wy
    from longscan.kernels.delta_rule.triton.wy_prep import wy_prepare
    B, T, H, K, V = 2, 100, 3, 16, 32
    x = {n: (t.to(DEV) if t is not None else None)
         for n, t in make_inputs("gated", B, T, H, K, V, torch.float32, seed=4).items()}
    q, k, v, beta, g = (x[n] for n in ("q", "k", "v", "beta", "g"))
    o = WY.resolved(k.dtype)
    prep = wy_prepare(q, k, v, beta, g, block_k=16, **wy.prepare_settings(o))
    c0, c1 = 16, 32
    settings = wy.serial_settings(o)

    def run_block(h0, out=None):
        N = prep.U.shape[2] // 64
        HS = torch.zeros(B, H, N, K, V, device=DEV)
        VN = torch.zeros_like(prep.U)
        S = wy_state.wy_state_forward_columns(k, prep.gate, prep.KB, prep.GC, prep.W, prep.U, h0, HS, VN, c0, c1,
                                              out=out, **settings)
        return S, HS[..., c0:c1], VN[..., c0:c1]

    h0 = torch.randn(B, H, K, c1 - c0, device=DEV)
    want = run_block(h0.contiguous())
    vmajor = h0.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)        # `[VB, B, H, K]` memory
    unmerged = h0.transpose(0, 1).contiguous().transpose(0, 1)               # H outer, B inner: copied
    carry = torch.full((c1 - c0, B, H, K), float("nan"), device=DEV)
    for got in (run_block(vmajor), run_block(unmerged), run_block(h0, out=carry.permute(1, 2, 3, 0))):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert torch.equal(carry.permute(1, 2, 3, 0), want[0])
    with pytest.raises(ValueError, match="out must be float32"):
        run_block(h0, out=torch.empty(B, H, K, c1 - c0, device=DEV, dtype=torch.float64))
    with pytest.raises(ValueError, match="B and H mergeable"):
        run_block(h0, out=torch.empty(H, B, K, c1 - c0, device=DEV).transpose(0, 1))


@pytest.mark.parametrize("kind", ["deltanet", "gated", "kda"])
def test_wy_gradients_from_the_final_state_alone(kind):
    """A loss on the final state only (o unused: its gradient reaches the kernels as None or zeros)."""
    compare_final_state_gradients(lambda **a: tc.forward(**a, options=WY), kind, 100, DEV)


@pytest.mark.parametrize("kind,low", [("gated", -4.0), ("kda", -5.0)])
def test_wy_steep_gates_stay_finite(kind, low):
    """Log decays down to -4 (a scalar gate) or -5 (per key) a token (exp(b) reaches e^-256 within a chunk):
    every decay is a difference b_t - b_s with s ≤ t, or per key split at a reference row a 16-row block, so
    nothing overflows; forward and gradients still match the recurrence."""
    gen = torch.Generator().manual_seed(21)
    shape = (1, 130, 1, 16, 16)
    x = make_inputs(kind, *shape, torch.float64, seed=21)
    x["g"] = low * torch.rand(x["g"].shape, generator=gen, dtype=torch.float64) - 0.5 * (kind == "gated")
    do = torch.randn(1, 130, 1, 16, generator=gen, dtype=torch.float64)
    dht = torch.randn(1, 1, 16, 16, generator=gen, dtype=torch.float64)
    ref = run(lambda **a: naive_recurrent_delta_rule(**a, output_final_state=True), x, do, dht)
    got = run(lambda **a: tc.forward(**a, output_final_state=True, options=WY), float32_on(x, DEV), do.float().to(DEV),
              dht.float().to(DEV))
    assert rel_err(got[0].cpu(), ref[0]) < 1e-5 and rel_err(got[1].cpu(), ref[1]) < 1e-5
    for n in ref[2]:
        assert torch.isfinite(got[2][n]).all(), n
        assert rel_err(got[2][n].cpu(), ref[2][n]) < 1e-5, n


def bf16_case(kind, seed, bf16_names, *grad_shapes, dim=64):
    """A GPU case: float64 inputs (B = 2, T = 300, H = 2, K = V = dim), random float64 gradients of the given
    shapes, and the inputs on the GPU (bf16_names in bf16, the rest in float32)."""
    x = make_inputs(kind, 2, 300, 2, dim, dim, torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in grad_shapes]
    xb = {n: (t.to("cuda", torch.bfloat16 if n in bf16_names else torch.float32) if t is not None else None)
          for n, t in x.items()}
    return x, xb, grads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 products need a GPU")
@pytest.mark.parametrize("kind", ["deltanet", "gated", "kda"])
def test_wy_bf16_on_gpu(kind):
    """bf16 inputs (bf16 operands, float32 sums, bf16 chunk quantities) against the float64 recurrence."""
    x, xb, (do, dht) = bf16_case(kind, 11, ("q", "k", "v"), (2, 300, 2, 64), (2, 2, 64, 64))
    ref = run(lambda **a: naive_recurrent_delta_rule(**a, output_final_state=True), x, do, dht)
    got = run(lambda **a: tc.forward(**a, output_final_state=True, options=DeltaTritonOptions(path="wy")), xb,
              do.to("cuda", torch.bfloat16), dht.float().cuda())
    assert rel_err(got[0].cpu(), ref[0]) < 2e-2
    assert rel_err(got[1].cpu(), ref[1]) < 2e-2
    for n in ref[2]:
        assert rel_err(got[2][n].cpu(), ref[2][n]) < 5e-2, n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 products need a GPU")
@pytest.mark.parametrize("settings", [dict(wy_state_block_v=32), dict(wy_state_block_v=64),
                                      dict(wy_inverse_num_warps=8), dict(wy_bwd_from_inputs=True)],
                         ids=["serial_32", "serial_64", "inverse_w8", "bwd_from_inputs"])
@pytest.mark.parametrize("kind", ["deltanet", "gated", "kda"])
def test_wy_settings_bf16_on_gpu(kind, settings):
    """K = V = 128 as models run: the serial kernels at the widths a launch over many sequences × heads takes (8
    warps at 64 columns), and the settings not on by default, against the float64 recurrence."""
    x, xb, (do, dht) = bf16_case(kind, 13, ("q", "k", "v"), (2, 300, 2, 128), (2, 2, 128, 128), dim=128)
    ref = run(lambda **a: naive_recurrent_delta_rule(**a, output_final_state=True), x, do, dht)
    options = DeltaTritonOptions(path="wy", **settings)
    got = run(lambda **a: tc.forward(**a, output_final_state=True, options=options), xb,
              do.to("cuda", torch.bfloat16), dht.float().cuda())
    assert rel_err(got[0].cpu(), ref[0]) < 2e-2
    assert rel_err(got[1].cpu(), ref[1]) < 2e-2
    for n in ref[2]:
        assert rel_err(got[2][n].cpu(), ref[2][n]) < 5e-2, n


@pytest.mark.parametrize("kind", ["gated", "kda"])
def test_wy_runs_its_own_kernels(kind):
    """path="wy" reaches the wy stages (and path="float32" does not) for the kinds it covers: the scan's
    trace event names the path that ran."""
    x = {n: (t.to(DEV) if t is not None else None)
         for n, t in make_inputs(kind, 1, 20, 1, 16, 16, torch.float32, seed=3).items()}
    for options, path in ((WY, "wy"), (DeltaTritonOptions(path="float32", block_v=16), "float32")):
        with trace.record() as events:
            tc.forward(**x, options=options)
        assert [e.info["path"] for e in events if e.name == "delta_scan"] == [path]


def test_auto_resolves_by_the_inputs_dtype():
    """path="auto" (the default) is "wy" for bf16 and "float32" for float32 and float16 inputs; the settings
    the chosen path does not read return to their defaults; "float32" and "wy" stay as they are."""
    assert DeltaTritonOptions().path == "auto"
    auto = DeltaTritonOptions(chunk=16, block_v=16, inverse="blocks", wy_state_block_v=32)
    assert auto.resolved(torch.bfloat16) == DeltaTritonOptions(path="wy", block_v=16, wy_state_block_v=32)
    assert auto.resolved(torch.float32) == DeltaTritonOptions(path="float32", chunk=16, block_v=16, inverse="blocks")
    assert auto.resolved(torch.float16).path == "float32"
    for path in ("float32", "wy"):
        o = DeltaTritonOptions(path=path, block_v=16)
        assert o.resolved(torch.bfloat16) is o and o.resolved(torch.float32) is o


def _scans(events):
    return [(e.info["path"], e.info["outputs"]) for e in events if e.name == "delta_scan"]


def test_auto_runs_float32_kernels_on_float32_inputs():
    """The default options (None, or DeltaTritonOptions()) on float32 inputs run path="float32", in the forward
    and in the segment transitions, and their results are path="float32"'s."""
    from longscan.kernels.delta_rule import chunk_delta_rule
    x = {n: (t.to(DEV) if t is not None else None)
         for n, t in make_inputs("gated", 1, 20, 1, 16, 16, torch.float32, seed=4).items()}
    f32 = DeltaTritonOptions(path="float32")
    want_o, want_s = tc.forward(**x, output_final_state=True, options=f32)
    want_loc, want_M = tc.segment_transition(x["k"], x["v"], x["beta"], x["g"], options=f32)
    for options in (None, DeltaTritonOptions()):
        with trace.record() as events:
            o, s = chunk_delta_rule(**x, output_final_state=True, backend="triton", options=options)
            loc, M = tc.segment_transition(x["k"], x["v"], x["beta"], x["g"], options=options)
        assert _scans(events) == [("float32", True), ("float32", False)]
        assert torch.equal(o, want_o) and torch.equal(s, want_s)
        assert torch.equal(loc, want_loc) and torch.equal(M, want_M)


class _Reached(Exception):
    """Raised where the wy kernels would start (the interpreter runs float32 only)."""


def test_auto_runs_wy_kernels_on_bf16_inputs(monkeypatch):
    """The default options on bf16 q, k, v reach the wy kernels, forward and segment transitions ([v | 0] in
    bf16), with the options wy reads; the scan's trace event says "wy". Stopped at the kernels' entry."""
    from longscan.kernels.delta_rule import chunk_delta_rule
    from longscan.kernels.delta_rule.triton import chunk
    reached = []

    def stop(**a):
        reached.append((a["options"], a["v"].dtype, a["q"] is not None))
        raise _Reached
    monkeypatch.setattr(chunk, "wy_scan", stop)
    x = make_inputs("kda", 1, 20, 1, 16, 16, torch.float32, seed=5)
    x.update({n: x[n].to(torch.bfloat16) for n in ("q", "k", "v")})
    calls = (lambda: chunk_delta_rule(**x, backend="triton"),
             lambda: tc.forward(**x, options=DeltaTritonOptions(chunk=16, wy_state_block_v=32)),
             lambda: tc.segment_transition(x["k"], x["v"], x["beta"], x["g"]))
    for call in calls:
        with trace.record() as events, pytest.raises(_Reached):
            call()
        assert [e.info["path"] for e in events if e.name == "delta_scan"] == ["wy"]
    wy = DeltaTritonOptions(path="wy")
    assert reached == [(wy, torch.bfloat16, True), (DeltaTritonOptions(path="wy", wy_state_block_v=32),
                                                     torch.bfloat16, True), (wy, torch.bfloat16, False)]


def test_settings_a_path_does_not_run_are_refused():
    """Where the options are built: intra="torch" and recompute=True on a path that may run wy, a float32-path
    setting on path="wy" and a wy setting on path="float32", each named; "auto" takes both paths' settings."""
    for kw in (dict(recompute=True), dict(intra="torch")):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"DeltaTritonOptions.{name}=.*path='auto' runs path='wy' for bf16"):
            DeltaTritonOptions(**kw)
        assert DeltaTritonOptions(path="float32", **kw).path == "float32"
    for name, value in (("chunk", 64), ("block_k", 32), ("inter_block_k", 16), ("intra_num_stages", 2),
                        ("inverse", "blocks")):
        with pytest.raises(ValueError, match=f"DeltaTritonOptions.{name}: path='wy' does not read it"):
            DeltaTritonOptions(path="wy", **{name: value})
        for path in ("auto", "float32"):
            assert getattr(DeltaTritonOptions(path=path, **{name: value}), name) == value
    for name, value in (("wy_state_block_v", 32), ("wy_state_num_warps", 8), ("wy_inverse_num_warps", 8),
                        ("wy_bwd_from_inputs", True)):
        with pytest.raises(ValueError, match=f"DeltaTritonOptions.{name}: path='float32' does not read it"):
            DeltaTritonOptions(path="float32", **{name: value})
        for path in ("auto", "wy"):
            assert getattr(DeltaTritonOptions(path=path, **{name: value}), name) == value
    from longscan.kernels.delta_rule.triton import scan
    x = make_inputs("deltanet", 1, 4, 1, 16, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="scan runs one kernel set"):
        scan(q=x["q"], k=x["k"], v=x["v"], beta=x["beta"], g=None, h0=None, scale=1.0, options=DeltaTritonOptions())


def transition_grads(fn, x, dloc, dM):
    """fn(k, v, beta, g) -> ((S_loc, M), the gradients of k, v, beta and g (when given) from dloc and dM)."""
    names = [n for n in ("k", "v", "beta", "g") if x[n] is not None]
    leaves = {n: x[n].clone().requires_grad_() for n in names}
    loc, M = fn(leaves["k"], leaves["v"], leaves["beta"], leaves.get("g"))
    return (loc, M), dict(zip(names, torch.autograd.grad((loc, M), [leaves[n] for n in names], (dloc, dM))))


# (B, T, H, K, V): a part of a chunk; three chunks with a padded last one, K ≠ V ([v | 0] is V + K = 40 wide:
# three blocks of the serial kernels' 16 columns, the last part masked)
TRANSITION_SHAPES = [(2, 37, 1, 16, 16), (1, 150, 2, 16, 24)]


@pytest.mark.parametrize("shape", TRANSITION_SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
@pytest.mark.parametrize("kind", ["deltanet", "gated", "kda"])
def test_wy_segment_transitions_match_float64(kind, shape):
    """The SP stages' segment transitions (q None: the scan on [v | 0] from [0 | I] without outputs) run
    path="wy" and match the float64 chunked ones, (S_loc, M) and the gradients of k, v, β and g from random
    gradients of both."""
    from longscan.kernels.delta_rule import torch_chunk
    from longscan.kernels.delta_rule.triton import wy
    B, T, H, K, V = shape
    x = make_inputs(kind, B, T, H, K, V, torch.float64, seed=T + 3)
    gen = torch.Generator().manual_seed(T)
    dloc = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    dM = torch.randn(B, H, K, K, generator=gen, dtype=torch.float64)
    ref, ref_grads = transition_grads(torch_chunk.segment_transition, x, dloc, dM)
    calls = []
    orig = wy.DeltaRuleWY.apply
    wy.DeltaRuleWY.apply = lambda *a: calls.append(a[0] is None) or orig(*a)
    try:
        got, got_grads = transition_grads(lambda *a: tc.segment_transition(*a, options=WY), float32_on(x, DEV),
                                          dloc.float().to(DEV), dM.float().to(DEV))
    finally:
        wy.DeltaRuleWY.apply = orig
    assert calls == [True]
    assert got[0].dtype == got[1].dtype == torch.float32
    assert rel_err(got[0].cpu(), ref[0]) < 1e-5 and rel_err(got[1].cpu(), ref[1]) < 1e-5
    assert set(got_grads) == set(ref_grads)
    for n in ref_grads:
        assert rel_err(got_grads[n].cpu(), ref_grads[n]) < 1e-5, n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 products need a GPU")
@pytest.mark.parametrize("kind", ["deltanet", "gated", "kda"])
def test_wy_segment_transitions_bf16_on_gpu(kind):
    """bf16 k, v ([v | 0] in bf16, the identity a float32 initial state) against the float64 transitions."""
    from longscan.kernels.delta_rule import torch_chunk
    x, xb, (dloc, dM) = bf16_case(kind, 13, ("k", "v"), (2, 2, 64, 64), (2, 2, 64, 64))
    ref, ref_grads = transition_grads(torch_chunk.segment_transition, x, dloc, dM)
    got, got_grads = transition_grads(
        lambda *a: tc.segment_transition(*a, options=DeltaTritonOptions(path="wy")), xb, dloc.float().cuda(),
        dM.float().cuda())
    assert rel_err(got[0].cpu(), ref[0]) < 2e-2 and rel_err(got[1].cpu(), ref[1]) < 2e-2
    for n in ref_grads:
        assert rel_err(got_grads[n].cpu(), ref_grads[n]) < 5e-2, n


def test_wy_options_are_checked():
    # T·H·K = 2³¹ (expanded views: nothing is allocated before the check)
    T, H = 2 ** 17, 2 ** 10
    big = {n: torch.ones(1, 1, 1, 16).expand(1, T, H, 16) for n in ("q", "k", "v")}
    with pytest.raises(ValueError, match="T·H·max"):
        tc.forward(**big, beta=torch.ones(1, 1, 1).expand(1, T, H), options=WY)
    with pytest.raises(ValueError, match="path must be one of"):
        DeltaTritonOptions(path="bf16")
    with pytest.raises(ValueError, match="intra='triton' and recompute=False"):
        DeltaTritonOptions(path="wy", recompute=True)
    with pytest.raises(ValueError, match="intra='triton' and recompute=False"):
        DeltaTritonOptions(path="wy", intra="torch")


_COMPILE = r'''
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks.tuning import delta_compile
from benchmarks.tuning.kernel_resources import ptxas_report
from longscan.kernels.delta_rule.triton import DeltaTritonOptions, wy, wy_grads, wy_output, wy_prep, wy_state

# without alignment hints the rows-scaling serial backward, the serial kernels at 64 columns and per-key gates'
# serial backward at 32 spill (Triton 3.9): they are compiled as launched, with them, by
# test_wy_gate_options_compile_without_spills; here the serial backward that scales q and k, and the serial
# kernels at the other widths they launch
o = DeltaTritonOptions(path="wy", wy_gate_rows=False)
K = V = 128
BF16 = {"Q", "K_", "V_", "P_", "W", "U", "HS", "VN", "DHS", "DVN", "DVL", "DO", "DQ", "DK", "DW", "DV", "KB", "QG",
        "QK"}
GATE = int(sys.argv[1])   # 1: a scalar gate, 2: per-key gates (the inverse reads neither: compiled once, with 1)
HAS_Q = len(sys.argv) < 3 or sys.argv[2] == "q"   # "no_q": the segment transitions' variants (no output kernels)


def counts(fn, consts, warps, stages):
    ints = ("T", "H", "N", "K", "V", "V0", "VB", "NDB") + delta_compile.STRIDES
    sig = {a: "constexpr" if a in consts else "i32" if a in ints else "fp32" if a == "scale" else "*bf16" if a in BF16
           else "*fp32" for a in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    r = ptxas_report(k)
    return dict(regs=r["registers"], spills=r["spill_stores"] + r["spill_loads"])


P = dict(GATE=GATE, PREC=o.input_precision)
BK, BV = wy.parallel_block_k(K, GATE), min(o.block_v, V)
FBV = min(wy.parallel_settings(o, forward=True)["block_v"], V)   # the forward's W/U and output
# the serial kernels' widths these options launch: few and many sequences × heads on a 132-SM GPU
SVS, BWD_SVS = ([sorted({wy_state.serial_block_v(o.wy_state_block_v, V, BH, GATE, 132, rows)
                         for BH in (1, 64, 256)} - skip) for rows, skip in ((True, {64}), (o.wy_gate_rows, {32, 64}))])
UNIT = dict(si_v=1, so_v=1)   # contiguous states' column strides, specialized to constants at launch
PAR = (o.num_warps, 3)   # Triton's default stages: 3
SER = lambda SV: (wy_state.serial_num_warps(o.wy_state_num_warps, SV), o.inter_num_stages)  # noqa: E731
KERNELS = (
    ("kkt", wy_prep._wy_kkt, dict(P, BK=BK, WRITE_QK=GATE == 2 and HAS_Q), PAR),
    ("inverse", wy_prep._wy_inverse, {}, (o.wy_inverse_num_warps, 3)),
    ("w_u", wy_prep._wy_w_u, dict(P, HAS_Q=HAS_Q, BK=BK, BV=FBV), PAR),
    *((f"state_fwd_{SV}", wy_state._wy_state_fwd, dict(P, HAS_H0=True, KP=K, BV=SV, **UNIT), SER(SV)) for SV in SVS),
    *((f"state_bwd_{SV}", wy_state._wy_state_bwd,
       dict(P, HAS_Q=HAS_Q, HAS_DHT=True, KP=K, BV=SV, GATE_ROWS=o.wy_gate_rows, **UNIT), SER(SV))
      for SV in BWD_SVS),
    ("output", wy_output._wy_output, dict(P, BK=BK, BV=FBV), PAR),
    ("dv_local", wy_grads._wy_dv_local, dict(P, BK=BK, BV=BV), PAR),
    ("dqkw", wy_grads._wy_dqkw, dict(P, HAS_Q=HAS_Q, BK=BK, BV=BV), PAR),
    *((f"bwd{'_from_inputs' if da else ''}", wy_grads._wy_bwd,
       dict(P, BK=wy_grads.bwd_block_k(BK, GATE), BV=BV, DA_INPUTS=da), PAR) for da in sorted({False, GATE != 2})),
)
print(json.dumps({name: counts(fn, consts, *launch) for name, fn, consts, launch in KERNELS
                  if (GATE == 1 or name != "inverse") and (HAS_Q or name not in ("output", "dv_local"))}))
'''


@pytest.mark.parametrize("triton_dir", TRITON_DIRS)
def test_wy_kernels_compile_for_hopper_without_spills(triton_dir):
    """Every kernel for a scalar gate, the serial forward at 16 and 32 columns, the WY backward with dA from U and W
    and from the inputs."""
    assert_compiled_without_spills(_COMPILE, "1", kernels=11, first_on_path=triton_dir)


@pytest.mark.parametrize("triton_dir", TRITON_DIRS)
def test_wy_per_key_kernels_compile_for_hopper_without_spills(triton_dir):
    """The kernels that read a gate, compiled for per-key gates (KDA), the serial forward at 16 and 32 columns."""
    assert_compiled_without_spills(_COMPILE, "2", kernels=9, first_on_path=triton_dir)


@pytest.mark.parametrize("gate", [1, 2], ids=["scalar_gate", "per_key"])
def test_wy_transition_kernels_compile_for_hopper_without_spills(gate):
    """The variants without q that the segment transitions run (``_wy_w_u``, the serial backward and
    ``_wy_dqkw`` at HAS_Q=False, beside the kernels they share), K = V = 128 in bf16: no spills."""
    assert_compiled_without_spills(_COMPILE, str(gate), "no_q", kernels=9 if gate == 1 else 7)


_COMPILE_OPTIONS = r'''
import dataclasses
import json

import torch
from benchmarks.tuning import delta_compile
from benchmarks.tuning.kernel_resources import ptxas_report
from longscan.kernels.delta_rule.triton import DeltaTritonOptions

# as launched (alignment hints on), with an entering state (its gradient): the default serial backward (scaling
# its products' rows) at the widths it launches, the WY backward under the default 128-register cap, and every
# kind's serial kernels at 64 columns (8 warps)
o = DeltaTritonOptions(path="wy")
assert o.wy_gate_rows and o.wy_max_registers == 128 and o.wy_state_block_v is None
out = {}
for kind, name, width, cap in (("gated", "wy_state_bwd", 16, 128), ("gated", "wy_state_bwd", 32, None),
                               ("gated", "wy_bwd", None, 128), ("kda", "wy_state_bwd", 32, None),
                               *((kind, name, 64, None) for kind in ("deltanet", "gated", "kda")
                                 for name in ("wy_state_fwd", "wy_state_bwd"))):
    at = dataclasses.replace(o, wy_state_block_v=width)
    r = ptxas_report(delta_compile.compile_kernel(kind, name, True, torch.bfloat16, 128, at))
    # over the cap is failed as a spill would be: two programs an SM is what the options are for (at 32 and 64
    # columns the serial backward's shared memory leaves room for one)
    over = cap is not None and r["registers"] > cap
    out[f"{kind}_{name}_{width}"] = dict(regs=r["registers"], spills=r["spill_stores"] + r["spill_loads"] + over)
print(json.dumps(out))
'''


@pytest.mark.parametrize("triton_dir", TRITON_DIRS)
def test_wy_gate_options_compile_without_spills(triton_dir):
    """wy_gate_rows' serial backward and the WY backward at wy_max_registers=128 (a scalar gate, K = V = 128, bf16,
    compiled for sm_90a as launched): the WY backward and the serial one at 16 columns within 128 registers a
    thread (two programs an SM); the serial one at 32 columns (per-key gates' too), and every kind's serial kernels
    at 64 (8 warps), one program an SM by their shared memory, uncapped; none spills."""
    assert_compiled_without_spills(_COMPILE_OPTIONS, kernels=10, first_on_path=triton_dir)


def test_serial_kernels_width_follows_the_launch():
    """wy_state_block_v=None: the widest of 64 and 32 columns a serial program at which a launch still has a program
    an SM, else 16; wy_state_num_warps=None: 8 warps at 64 columns, else 4."""
    width = wy_state.serial_block_v
    assert width(None, 128, 256, 0, 132) == 64    # 16 sequences × 16 heads, V = 128: 512 programs at 64
    assert width(None, 128, 256, 1, 132) == 64 and width(None, 128, 256, 2, 132) == 64   # every gate
    assert width(None, 128, 64, 0, 132) == 32     # 4 sequences × 16 heads: 128 programs at 64, 256 at 32
    assert width(None, 128, 16, 0, 132) == 16     # one sequence × 16 heads: 64 programs at 32
    assert width(None, 32, 256, 1, 132) == 32     # the relay's blocks of 32 columns, a scalar gate
    assert width(None, 32, 128, 1, 132) == 16
    assert width(None, 128, 256, 1, 132, gate_rows=False) == 16
    assert width(None, 128, 256, 0, 0) == 16      # no GPU: the interpreter
    assert width(64, 128, 1, 0, 132) == 64 and width(32, 16, 256, 0, 132) == 16   # as given, at most the launch's
    for value in (3, 0, True):
        with pytest.raises(ValueError, match="wy_inverse_num_warps must be a power of two"):
            DeltaTritonOptions(wy_inverse_num_warps=value)
    with pytest.raises(ValueError, match="wy_bwd_from_inputs must be a bool"):
        DeltaTritonOptions(wy_bwd_from_inputs=1)
    assert [wy_state.serial_num_warps(None, v) for v in (16, 32, 64)] == [4, 4, 8]
    assert wy_state.serial_num_warps(2, 64) == 2                               # as given
    o = DeltaTritonOptions()
    assert o.wy_state_block_v is None and o.wy_state_num_warps is None and o.wy_forward_block_v == 64
    for value in (8, 48, False):
        with pytest.raises(ValueError, match="wy_forward_block_v must be None .block_v. or a power of two"):
            DeltaTritonOptions(wy_forward_block_v=value)
    for value in (8, 24, True, "32"):
        with pytest.raises(ValueError, match="wy_state_block_v must be None .chosen per launch. or a power of two"):
            DeltaTritonOptions(wy_state_block_v=value)


def test_wy_max_registers_is_checked():
    for value in (100, 256, True, "128"):
        with pytest.raises(ValueError, match="DeltaTritonOptions.wy_max_registers must be None or a multiple of 8"):
            DeltaTritonOptions(wy_max_registers=value)
    with pytest.raises(ValueError, match="DeltaTritonOptions.wy_max_registers: path='float32' does not read it"):
        DeltaTritonOptions(path="float32", wy_max_registers=None)   # not the default (128)
    with pytest.raises(ValueError, match="DeltaTritonOptions.wy_gate_rows must be a bool"):
        DeltaTritonOptions(wy_gate_rows=1)
