"""The delta rule's Triton backend (the recurrence across chunks in Triton kernels) against the float64
recurrence, forward and backward with states, every kind, chunks of 16 so short sequences cross several
(and a padded last one); the SP stages on it. CPU: the Triton interpreter in float32. GPU: also bf16, on the
default path (wy) and on path="float32"."""
import pytest
import torch

from delta_cases import KINDS, make_inputs, run_with_grads as run
from harness import rel_err, run_compiled

triton = pytest.importorskip("triton")

from longscan.kernels.delta_rule import chunk_delta_rule, naive_recurrent_delta_rule, torch_chunk  # noqa: E402
from longscan.kernels.delta_rule import triton_chunk as tc  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_recurrence(kind, with_state):
    B, T, H, K, V = 1, 37, 2, 16, 20       # V over 16: two blocks of V columns with BLOCK_V = 16
    x = make_inputs(kind, B, T, H, K, V, torch.float64, seed=KINDS.index(kind))
    if not with_state:
        x["initial_state"] = None
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    ref = run(lambda **a: naive_recurrent_delta_rule(**a, output_final_state=True), x, do, dht)
    x32 = {n: (t.float().to(DEV) if t is not None else None) for n, t in x.items()}
    mp = pytest.MonkeyPatch()
    mp.setattr(tc, "BLOCK_V", 16)
    try:
        got = run(lambda **a: tc.forward(**a, output_final_state=True, chunk=16), x32, do.float().to(DEV),
                  dht.float().to(DEV))
    finally:
        mp.undo()
    assert rel_err(got[0].cpu(), ref[0]) < 1e-5 and rel_err(got[1].cpu(), ref[1]) < 1e-5
    assert set(got[2]) == set(ref[2])
    for n in ref[2]:
        assert rel_err(got[2][n].cpu(), ref[2][n]) < 1e-5, n


@pytest.mark.parametrize("kind", KINDS)
def test_triton_segment_transition(kind):
    x = make_inputs(kind, 1, 20, 1, 16, 16, torch.float64, seed=3)
    ref_S, ref_M = torch_chunk.segment_transition(x["k"], x["v"], x["beta"], x["g"], chunk=16)
    x32 = {n: (t.float().to(DEV) if t is not None else None) for n, t in x.items()}
    S, M = tc.segment_transition(x32["k"], x32["v"], x32["beta"], x32["g"], chunk=16)
    assert rel_err(S.cpu(), ref_S) < 1e-5 and rel_err(M.cpu(), ref_M) < 1e-5


def test_triton_refuses_float64():
    x = make_inputs("deltanet", 1, 4, 1, 16, 16, torch.float64, seed=0)
    with pytest.raises(TypeError, match="computes in float32"):
        chunk_delta_rule(**x, backend="triton")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["default", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_bf16_on_gpu(kind, path):
    """bf16 q, k, v on the default options (path="auto": the wy kernels run) and on path="float32"."""
    from longscan.kernels import trace
    from longscan.kernels.delta_rule.triton import DeltaTritonOptions
    x = make_inputs(kind, 2, 1000, 4, 64, 64, torch.float64, seed=5)
    ref, ref_s = naive_recurrent_delta_rule(**x, output_final_state=True)
    low = {n: (t.to(DEV, torch.bfloat16) if n in ("q", "k", "v") else t.to(DEV, torch.float32))
           for n, t in x.items() if t is not None}
    options = DeltaTritonOptions(path="float32") if path == "float32" else None
    with trace.record() as events:
        o, s = chunk_delta_rule(**low, output_final_state=True, options=options)
    assert [e.info["path"] for e in events if e.name == "delta_scan"] == ["wy" if path == "default" else "float32"]
    assert o.dtype == torch.bfloat16 and rel_err(o.cpu(), ref) < 2e-2 and rel_err(s.cpu(), ref_s) < 2e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_state", [True, False], ids=["states", "no_states"])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (64, 128)], ids=lambda d: "K{}V{}".format(*d))
@pytest.mark.parametrize("kind", KINDS)
def test_triton_bf16_gradients_on_gpu(kind, dims, with_state):
    """bf16 q, k, v on the default options (the wy kernels), forward and backward, head dims up to 128, with
    and without states, against the float64 recurrence of the same rounded inputs: every tensor at bf16's level
    (the kernels keep P, W, U, the entering states and v_n in bf16)."""
    K, V = dims
    x = make_inputs(kind, 1, 300, 2, K, V, torch.float64, seed=7 + K + V)
    if not with_state:
        x["initial_state"] = None
    x = {n: (t.to(torch.bfloat16).double() if n in ("q", "k", "v") else t.float().double()) if t is not None
         else None for n, t in x.items()}
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(1, 300, 2, V, generator=gen, dtype=torch.float64).to(torch.bfloat16).double()
    dht = torch.randn(1, 2, K, V, generator=gen, dtype=torch.float64)
    ref = run(lambda **a: naive_recurrent_delta_rule(**a, output_final_state=True), x, do, dht)
    low = {n: (t.to(DEV, torch.bfloat16) if n in ("q", "k", "v") else t.to(DEV, torch.float32)) if t is not None
           else None for n, t in x.items()}
    got = run(lambda **a: chunk_delta_rule(**a, output_final_state=True), low, do.to(DEV, torch.bfloat16),
              dht.to(DEV, torch.float32))
    assert rel_err(got[0].double().cpu(), ref[0]) < 3e-2 and rel_err(got[1].double().cpu(), ref[1]) < 3e-2
    assert set(got[2]) == set(ref[2])
    for n in ref[2]:
        assert rel_err(got[2][n].double().cpu(), ref[2][n]) < 5e-2, n


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_sp_stages_on_gpu_one_rank(kind):
    """The SP operator's stages (segment maps, the scan of zigzag's two pieces, the output pass from the
    carries) on the GPU kernels, float32, forward and backward, against the float64 recurrence."""
    from longscan.parallel import delta_rule_attention
    x = make_inputs(kind, 2, 256, 4, 64, 64, torch.float64, seed=6)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(2, 256, 4, 64, generator=gen, dtype=torch.float64)
    dht = torch.randn(2, 4, 64, 64, generator=gen, dtype=torch.float64)
    ref = run(lambda **a: naive_recurrent_delta_rule(**a, output_final_state=True), x, do, dht)
    x32 = {n: (t.float().to(DEV) if t is not None else None) for n, t in x.items()}
    got = run(lambda **a: delta_rule_attention(**a, output_final_state=True, layout="zigzag"), x32,
              do.float().to(DEV), dht.float().to(DEV))
    assert rel_err(got[0].cpu(), ref[0]) < 1e-4 and rel_err(got[1].cpu(), ref[1]) < 1e-4
    for n in ref[2]:
        assert rel_err(got[2][n].cpu(), ref[2][n]) < 1e-4, n


COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from longscan.kernels.delta_rule import triton_chunk as tc
for fn, flags in ((tc._inter_fwd, dict(HAS_Q=True, HAS_H0=True)), (tc._inter_bwd, dict(HAS_Q=True, HAS_DHT=True))):
    consts = dict(flags, GATE=2, BC=tc._pow2(tc.CHUNK), BK=128, BV=tc.BLOCK_V, PREC="ieee")
    sig = {a: "constexpr" if a in consts else "i32" if a in ("N", "C", "K", "V") else "fp32" if a == "scale"
           else "*fp32" for a in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=tc.NUM_WARPS))
    print(fn.__name__, k.metadata.shared)
"""


def test_kernels_compile_for_h100_within_shared_memory():
    """Both kernels compile for sm_90 at K = 128 (no GPU needed) and their shared memory fits an H100's
    227 KiB a block, or the launch would fail there."""
    out = run_compiled("-c", COMPILE)
    assert out.returncode == 0, out.stderr[-2000:]
    shared = {line.split()[0]: int(line.split()[1]) for line in out.stdout.splitlines()}
    assert set(shared) == {"_inter_fwd", "_inter_bwd"}
    assert all(0 < s <= 227 * 1024 for s in shared.values()), shared
