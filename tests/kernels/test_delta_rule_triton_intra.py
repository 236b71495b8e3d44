"""The delta rule's Triton intra-chunk stage (the WY representation and its backward in Triton kernels) against
the float64 recurrence: every kind, forward and every gradient, with and without states, sequences shorter
than a chunk, exactly one, and several with a padded last one, K ≠ V; its quantities against the torch
stage's; the earlier torch intra path kept by options; the options' checks; the kernels' H100 shared memory.
CPU: the Triton interpreter in float32."""
import pytest
import torch

from delta_cases import KINDS, compare_final_state_gradients, compare_with_recurrence, make_inputs
from harness import rel_err, run_compiled

triton = pytest.importorskip("triton")

from longscan.kernels.delta_rule import chunk_delta_rule, torch_chunk  # noqa: E402
from longscan.kernels.delta_rule import triton_chunk as tc  # noqa: E402
from longscan.kernels.delta_rule.triton import DeltaTritonOptions  # noqa: E402
from longscan.kernels.delta_rule.triton.intra_fwd import intra_forward  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (B, T, H, K, V): one token; a part of a chunk with K ≠ V; exactly one chunk of 64; three chunks of 64
# with a padded last one (two blocks of V columns and of keys at block 16)
SHAPES = [(1, 1, 2, 16, 16), (2, 37, 1, 16, 32), (1, 64, 2, 32, 16), (2, 130, 2, 32, 32)]


def compare(kind, shape, with_state, options, seed):
    # dg of one token from no state is exactly zero in float64: in float32 it only needs to stay round-off
    compare_with_recurrence(lambda **a: tc.forward(**a, options=options), kind, shape, with_state, seed, DEV, 1e-5,
                            zero_atol=1e-6)


@pytest.mark.parametrize("with_state", [True, False], ids=["states", "no_states"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
@pytest.mark.parametrize("kind", KINDS)
def test_triton_intra_matches_recurrence(kind, shape, with_state):
    options = DeltaTritonOptions(path="float32", chunk=64, block_v=16, block_k=16)
    compare(kind, shape, with_state, options, seed=shape[1] + KINDS.index(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_default_options_match_recurrence(kind):
    """The defaults (chunks of 32: 130 tokens cross five, the last padded)."""
    compare(kind, (1, 130, 1, 16, 32), True, None, seed=7)


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("kind", KINDS)
def test_blocked_inverse_matches_recurrence(kind, chunk):
    """options.inverse="blocks" (two diagonal half-blocks, then their join): every output and gradient, over
    several chunks with a padded last one, and P inverts I + A."""
    compare(kind, (1, 70, 2, 16, 32), True, DeltaTritonOptions(path="float32", chunk=chunk, inverse="blocks"),
            seed=31 + chunk)
    x = make_inputs(kind, 1, 50, 1, 16, 16, torch.float64, seed=32)
    x32 = {n: (t.float().to(DEV) if t is not None else None) for n, t in x.items()}
    kw = dict(q=x32["q"], k=x32["k"], v=x32["v"], beta=x32["beta"], g=x32["g"], chunk=chunk, block_v=16,
              block_k=16, num_warps=4, num_stages=1, precision="ieee")
    rows, P_rows = intra_forward(**kw, inverse="rows")
    blocks, P_blocks = intra_forward(**kw, inverse="blocks")
    assert rel_err(P_blocks.cpu().double(), P_rows.cpu().double()) < 1e-5
    assert rel_err(blocks.W.cpu().double(), rows.W.cpu().double()) < 1e-5


@pytest.mark.parametrize("intra", ["triton", "torch"])
@pytest.mark.parametrize("kind", KINDS)
def test_recurrence_in_blocks_of_keys_matches_recurrence(kind, intra):
    """options.inter_block_k: the recurrence's state and tiles as blocks of 16 keys (K = 32: two, and K = 20:
    a padded second), every output and gradient, on both intra paths."""
    options = DeltaTritonOptions(path="float32", chunk=16, inter_block_k=16, intra=intra)
    compare(kind, (1, 37, 2, 32, 16), True, options, seed=41)
    compare(kind, (1, 20, 1, 20, 16), False, options, seed=42)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_intra_path_still_selectable(kind):
    compare(kind, (1, 37, 2, 16, 32), True, DeltaTritonOptions(path="float32", chunk=16, intra="torch"), seed=11)


@pytest.mark.parametrize("kind", KINDS)
def test_recompute_matches_recurrence_and_keeps_less(kind):
    """options.recompute: the backward runs the forward's stages again, with the same gradients, and what the
    forward keeps for it is the inputs alone."""
    compare(kind, (2, 37, 1, 16, 32), True, DeltaTritonOptions(path="float32", chunk=16, recompute=True), seed=13)
    x = {n: (t.to(DEV) if t is not None else None)
         for n, t in make_inputs(kind, 1, 64, 2, 16, 16, torch.float32, seed=14).items()}
    kept = {}
    for recompute in (False, True):
        leaves = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tc.forward(**leaves, options=DeltaTritonOptions(path="float32", chunk=16, recompute=recompute))
        kept[recompute] = sum(sizes)
    inputs = sum(t.numel() * t.element_size() for t in x.values() if t is not None)
    assert kept[True] <= inputs < kept[False], kept


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_from_the_final_state_alone(kind):
    """A loss on the final state only (o unused)."""
    options = DeltaTritonOptions(path="float32", chunk=16)
    compare_final_state_gradients(lambda **a: tc.forward(**a, options=options), kind, 40, DEV)


@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_intra_quantities_match_torch_stage(kind, with_q):
    """W, U_0, tril(Q̃K̂ᵀ), Q̃, K̄ and l of every chunk equal the torch stage's (float64 there), and P inverts I + A."""
    B, T, H, K, V, C = 2, 50, 2, 16, 32, 32
    x = make_inputs(kind, B, T, H, K, V, torch.float64, seed=21)
    g = x["g"]
    chunked = [torch_chunk._chunks(t, C) if t is not None else None
               for t in (x["q"] if with_q else None, x["k"], x["v"], x["beta"].unsqueeze(-1),
                         (g.unsqueeze(-1) if g is not None and g.dim() == 3 else g))]
    ref = torch_chunk._intra(*chunked)
    x32 = {n: (t.float().to(DEV) if t is not None else None) for n, t in x.items()}
    got, P = intra_forward(q=x32["q"] if with_q else None, k=x32["k"], v=x32["v"], beta=x32["beta"], g=x32["g"],
                           chunk=C, block_v=16, block_k=16, num_warps=4, num_stages=1,
                           precision="ieee", inverse="rows")
    for name, a, b in zip(got._fields, got, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a.cpu().double().reshape(b.shape), b) < 1e-6, name
    kc, bc = chunked[1], chunked[3]
    kk = kc @ kc.transpose(-1, -2)
    # P is unit lower triangular, and without a gate the inverse of I + A
    eye = torch.eye(C, dtype=torch.float64)
    lhs_inv = P.cpu().double()
    assert torch.allclose(torch.tril(lhs_inv), lhs_inv) and torch.allclose(torch.diagonal(lhs_inv, 0, -2, -1),
                                                                           torch.ones(B, H, 2, C, dtype=torch.float64))
    if g is None:
        lhs = eye + (bc * kk).tril(-1)
        assert rel_err(lhs_inv @ lhs, eye.expand_as(lhs)) < 1e-6


def test_options_are_checked():
    with pytest.raises(ValueError, match="DeltaTritonOptions.chunk"):
        DeltaTritonOptions(chunk=0)
    with pytest.raises(ValueError, match="DeltaTritonOptions.input_precision"):
        DeltaTritonOptions(input_precision="bf16")
    with pytest.raises(ValueError, match="DeltaTritonOptions.block_v must be a power of two"):
        DeltaTritonOptions(block_v=24)
    with pytest.raises(ValueError, match="DeltaTritonOptions.block_k must be at least 16"):
        DeltaTritonOptions(block_k=8)
    with pytest.raises(ValueError, match="DeltaTritonOptions.recompute must be a bool"):
        DeltaTritonOptions(recompute=1)
    with pytest.raises(ValueError, match="DeltaTritonOptions.inter_block_k must be None or a power of two"):
        DeltaTritonOptions(inter_block_k=24)
    with pytest.raises(ValueError, match="DeltaTritonOptions.inverse"):
        DeltaTritonOptions(inverse="lu")
    with pytest.raises(ValueError, match="DeltaTritonOptions.intra_num_stages must be a positive int"):
        DeltaTritonOptions(intra_num_stages=0)
    with pytest.raises(ValueError, match="DeltaTritonOptions.intra"):
        DeltaTritonOptions(intra="cuda")
    x = make_inputs("deltanet", 1, 4, 1, 16, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="options apply to the Triton backend only"):
        chunk_delta_rule(**x, backend="torch", options=DeltaTritonOptions())
    with pytest.raises(TypeError, match="options must be a DeltaTritonOptions"):
        tc.forward(**x, options={"chunk": 16})


COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from longscan.kernels.delta_rule.triton import DeltaTritonOptions, inter, intra_bwd, intra_fwd
from longscan.kernels.delta_rule.triton.inter import pow2
o = DeltaTritonOptions()
for fn, consts in ((intra_fwd._intra_fwd, dict(GATE=1, BK=128)), (intra_bwd._intra_bwd, dict(GATE=1, BK=128)),
                   (intra_fwd._intra_fwd_per_key, dict(BKS=o.block_k)),
                   (intra_bwd._intra_bwd_per_key, dict(BKS=o.block_k))):
    consts = dict(consts, HAS_Q=True, BC=pow2(o.chunk), BV=min(o.block_v, 128), PREC=o.input_precision)
    if "BLOCKED" in fn.arg_names:
        consts["BLOCKED"] = o.inverse == "blocks"
    sig = {a: "constexpr" if a in consts else "i32" if a in ("T", "H", "N", "C", "K", "V") else "fp32"
           if a == "scale" else "*fp32" for a in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=o.num_warps))
    print(fn.__name__, k.metadata.shared)
# the recurrence's kernels at both precisions (tf32 dots on sm_90 take their operands from shared memory)
for fn, flags, prec in ((inter._inter_bwd_states, dict(HAS_DHT=True, GATE=1), "ieee"),
                        (inter._inter_bwd_states, dict(HAS_DHT=True, GATE=1), "tf32"),
                        (inter._inter_fwd, dict(HAS_H0=True, GATE=2), "tf32"),
                        (inter._inter_bwd, dict(HAS_DHT=True, GATE=2), "tf32")):
    consts = dict(flags, HAS_Q=True, BC=pow2(o.chunk), BK=128, BV=o.block_v, PREC=prec)
    sig = {a: "constexpr" if a in consts else "i32" if a in ("N", "C", "K", "V") else "fp32" if a == "scale"
           else "*fp32" for a in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=o.num_warps))
    print(fn.__name__ + "_" + prec, k.metadata.shared)
"""


def test_intra_kernels_compile_for_h100_within_shared_memory():
    """The intra kernels compile for sm_90 at the default options with K = V = 128 (no GPU needed), and so do
    the recurrence's (the states-only backward at both precisions, the others with tf32 dots; the existing
    test compiles them with float32 ones); their shared memory fits an H100's 227 KiB a block, or the launch would
    fail there."""
    out = run_compiled("-c", COMPILE)
    assert out.returncode == 0, out.stderr[-2000:]
    shared = {line.split()[0]: int(line.split()[1]) for line in out.stdout.splitlines()}
    assert set(shared) == {"_intra_fwd", "_intra_bwd", "_intra_fwd_per_key", "_intra_bwd_per_key",
                           "_inter_bwd_states_ieee", "_inter_bwd_states_tf32", "_inter_fwd_tf32", "_inter_bwd_tf32"}
    assert all(0 <= s <= 227 * 1024 for s in shared.values()), shared
