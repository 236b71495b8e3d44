"""The local softmax-attention block contract: forward (o, lse) and backward (dq, dk, dv) of the torch and
naive backends against autograd through the float64 reference, the block identity ring attention relies on
(block gradients with the rows' final o/lse add up to the full gradient), the float32 logsumexp merge on
blocks whose logits differ by more than 80, GQA, and clear errors."""
import importlib.util
import sys

import pytest
import torch

from harness import rel_err
from longscan.kernels.softmax_attention import (attention, block_backward, block_forward, merge_into, merge_torch,
                                                naive_attention, resolve_backend)

DTYPES = {"float64": (torch.float64, 1e-5), "float32": (torch.float32, 1e-4)}
HEADS = {"mha": (4, 4), "gqa2": (4, 2), "gqa4": (4, 1)}


def inputs(hq, hkv, dtype, t_q=12, t_k=12, seed=0, d=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, t_q, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(2, t_k, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(2, t_k, hkv, d, generator=gen, dtype=torch.float64)
    do = torch.randn(2, t_q, hq, d, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, do)]


def reference(q, k, v, do, causal, scale=None):
    leaves = [x.detach().double().clone().requires_grad_() for x in (q, k, v)]
    o, lse = naive_attention(*leaves, scale, causal)
    return o, lse, torch.autograd.grad(o, leaves, do.double())


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_block_forward_backward_match_autograd_reference(backend, dname, heads, mask):
    dtype, tol = DTYPES[dname]
    q, k, v, do = inputs(*HEADS[heads], dtype)
    o_ref, lse_ref, g_ref = reference(q, k, v, do, mask == "causal")
    scale = q.shape[-1] ** -0.5
    o, lse = block_forward(q, k, v, scale, mask, backend)
    assert o.shape == q.shape and lse.shape == (2, q.shape[2], q.shape[1])
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(o, o_ref) <= tol and rel_err(lse, lse_ref) <= tol
    grads = block_backward(do, q, k, v, o, lse, scale, mask, backend)
    for name, got, want, x in zip(("dq", "dk", "dv"), grads, g_ref, (q, k, v)):
        assert got.shape == x.shape, name           # dk/dv come back with the Hkv heads of k/v
        assert rel_err(got, want) <= tol, (name, rel_err(got, want))


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("heads", ["mha", "gqa2"])
def test_blocks_merged_and_differentiated_with_final_lse_equal_whole(backend, dname, heads):
    """q of the second half against keys split into a full block and a causal diagonal block: merging the
    blocks gives the causal attention of the whole; each block's backward with the merged o/lse gives its
    share of the gradient."""
    dtype, tol = DTYPES[dname]
    q, k, v, do = inputs(*HEADS[heads], dtype, t_q=12, t_k=12, seed=1)
    o_ref, lse_ref, g_ref = reference(q, k, v, do, causal=True)
    h = 6
    scale = q.shape[-1] ** -0.5
    out = torch.zeros(q.shape, dtype=lse_ref.dtype if dtype == torch.float64 else torch.float32)
    lse = torch.full((2, q.shape[2], 12), float("-inf"), dtype=out.dtype)
    for qs, ks, mask in ((slice(0, h), slice(0, h), "causal"), (slice(h, 12), slice(h, 12), "causal"),
                         (slice(h, 12), slice(0, h), "full")):
        merge_into(out, lse, *block_forward(q[:, qs], k[:, ks], v[:, ks], scale, mask, backend), qs)
    assert rel_err(out, o_ref) <= tol and rel_err(lse, lse_ref) <= tol
    dq, dk, dv = (torch.zeros(x.shape, dtype=out.dtype) for x in (q, k, v))
    for qs, ks, mask in ((slice(0, h), slice(0, h), "causal"), (slice(h, 12), slice(h, 12), "causal"),
                         (slice(h, 12), slice(0, h), "full")):
        g = block_backward(do[:, qs], q[:, qs], k[:, ks], v[:, ks], out[:, qs], lse[:, :, qs], scale, mask, backend)
        dq[:, qs] += g[0]
        dk[:, ks] += g[1]
        dv[:, ks] += g[2]
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref):
        assert rel_err(got, want) <= tol, (name, rel_err(got, want))


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("gap", [85.0, 120.0, 1000.0])
def test_merge_is_exact_for_blocks_whose_logits_differ_by_more_than_80(dname, gap):
    """Block A's logits sit ``gap`` above block B's (and, for float64, far above exp's range). The merge must
    return block A's result and the exact lse, with no overflow or NaN, in either merge order."""
    dtype, tol = DTYPES[dname]
    q, k, v, _ = inputs(2, 2, dtype, t_q=5, t_k=8, seed=2)
    q[..., 0] = 1.0
    k[..., 0] = 0.0
    k[:, :4, :, 0] = gap + (800.0 if dtype == torch.float64 else 0.0)   # keys 0..3: block A
    k[:, 4:, :, 0] = 800.0 if dtype == torch.float64 else 0.0           # keys 4..7: block B
    o_ref, lse_ref = naive_attention(q, k, v, 1.0, causal=False)
    for order in ((slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 4))):
        out = torch.zeros(q.shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        lse = torch.full((2, 2, 5), float("-inf"), dtype=out.dtype)
        for ks in order:
            merge_into(out, lse, *block_forward(q, k[:, ks], v[:, ks], 1.0, "full", "torch"))
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        assert rel_err(out, o_ref) <= tol and rel_err(lse, lse_ref) <= tol


@pytest.mark.parametrize("backend", ["auto", "torch", "naive"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_autograd(backend, causal):
    q, k, v, do = inputs(4, 2, torch.float64, seed=3)
    o_ref, _, g_ref = reference(q, k, v, do, causal)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = attention(*leaves, causal=causal, backend=backend)
    o.backward(do)
    assert o.dtype == q.dtype and rel_err(o, o_ref) <= 1e-12
    for x, want in zip(leaves, g_ref):
        assert x.grad.dtype == x.dtype and rel_err(x.grad, want) <= 1e-12


def test_gradcheck_float64():
    q, k, v, _ = inputs(2, 1, torch.float64, t_q=5, t_k=5, seed=4, d=3)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=True, backend="torch"), leaves)


def test_auto_is_torch_on_cpu():
    assert resolve_backend("auto", torch.zeros(1, dtype=torch.float32)) == "torch"


def test_errors_name_the_parameter():
    q, k, v, _ = inputs(4, 2, torch.float32, t_q=6, t_k=4)
    with pytest.raises(ValueError, match="mask"):
        block_forward(q, k, v, 1.0, "causal", "torch")          # causal needs equal lengths
    with pytest.raises(ValueError, match="mask"):
        block_forward(q, k, v, 1.0, "sliding", "torch")
    with pytest.raises(ValueError, match="backend"):
        block_forward(q, k, v, 1.0, "full", "flash3")
    with pytest.raises(ValueError, match="sdpa_flash"):
        block_forward(q, k, v, 1.0, "full", "sdpa_flash")       # CUDA fp16/bf16 only
    with pytest.raises(TypeError, match="k.dtype"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="heads"):
        attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k, v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.numpy(), k, v)


def test_triton_backend_dispatches_when_present(monkeypatch):
    """backend="triton" calls triton_flash.flash_attn_forward/backward (Hkv expanded, dk/dv summed back)."""
    calls = []
    fake = type(sys)("longscan.kernels.softmax_attention.triton_flash")

    def fwd(q, k, v, scale, causal):
        calls.append("fwd")
        assert k.shape[2] == q.shape[2]
        o, lse = naive_attention(q, k, v, scale, causal)
        return o.to(q.dtype), lse.float()

    def bwd(do, q, k, v, o, lse, scale, causal):
        calls.append("bwd")
        with torch.enable_grad():      # called from inside an autograd.Function backward
            leaves = [x.detach().double().clone().requires_grad_() for x in (q, k, v)]
            return torch.autograd.grad(naive_attention(*leaves, scale, causal)[0], leaves, do.double())

    fake.flash_attn_forward, fake.flash_attn_backward = fwd, bwd
    if importlib.util.find_spec("longscan.kernels.softmax_attention.triton_flash") is None:
        monkeypatch.setitem(sys.modules, fake.__name__, fake)
    else:
        pytest.skip("the real triton_flash exists; its own tests cover it")
    q, k, v, do = inputs(4, 2, torch.float64, seed=5)
    o_ref, _, g_ref = reference(q, k, v, do, True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    attention(*leaves, causal=True, backend="triton").backward(do)
    assert calls == ["fwd", "bwd"]
    for x, want in zip(leaves, g_ref):
        assert x.grad.shape == x.shape and rel_err(x.grad, want) <= 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa_flash", "sdpa_cudnn"])
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_sdpa_backends_on_cuda(backend, mask):
    q, k, v, do = (x.cuda().bfloat16() for x in inputs(4, 2, torch.float32, t_q=256, t_k=256, d=64))
    o_ref, lse_ref, g_ref = reference(q, k, v, do, mask == "causal")
    scale = 64 ** -0.5
    o, lse = block_forward(q, k, v, scale, mask, backend)
    assert rel_err(o, o_ref) <= 1e-2 and rel_err(lse, lse_ref) <= 1e-2
    for name, got, want in zip(("dq", "dk", "dv"), block_backward(do, q, k, v, o, lse, scale, mask, backend), g_ref):
        assert rel_err(got, want) <= 1e-2, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa_flash", "sdpa_cudnn"])
def test_sdpa_blocks_with_final_lse_on_cuda(backend):
    """The ring identity with torch's fused ops: blocks merged in float32, then each block's backward given
    the merged o/lse, add up to the gradient of the whole causal attention (bf16, rel err 1e-2)."""
    q, k, v, do = (x.cuda().bfloat16() for x in inputs(4, 2, torch.float32, t_q=512, t_k=512, d=64, seed=6))
    o_ref, lse_ref, g_ref = reference(q, k, v, do, causal=True)
    h, scale = 256, 64 ** -0.5
    plan = ((slice(0, h), slice(0, h), "causal"), (slice(h, 512), slice(h, 512), "causal"),
            (slice(h, 512), slice(0, h), "full"))
    out = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    lse = torch.full((2, 4, 512), float("-inf"), device="cuda")
    for qs, ks, mask in plan:
        merge_into(out, lse, *block_forward(q[:, qs], k[:, ks], v[:, ks], scale, mask, backend), qs)
    assert rel_err(out, o_ref) <= 1e-2 and rel_err(lse, lse_ref) <= 1e-2
    o = out.bfloat16()
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32, device="cuda") for x in (q, k, v))
    for qs, ks, mask in plan:
        g = block_backward(do[:, qs], q[:, qs], k[:, ks], v[:, ks], o[:, qs], lse[:, :, qs], scale, mask, backend)
        dq[:, qs] += g[0]
        dk[:, ks] += g[1]
        dv[:, ks] += g[2]
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref):
        assert rel_err(got, want) <= 1e-2, (name, rel_err(got, want))


def _merge_case(seed, block_dtype, device):
    """Running (out, lse) of 2 × 11 rows × 3 heads × 48 (a head size that is not a power of two), a block for
    rows 3..10 whose lse spans ±90 from the running one, with rows unseen on either side or both (-inf)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(2, 11, 3, 48, generator=gen)
    lse = torch.randn(2, 3, 11, generator=gen) * 3
    blk = torch.randn(2, 8, 3, 48, generator=gen)
    blk_lse = lse[:, :, 3:] + torch.empty(2, 3, 8).uniform_(-90, 90, generator=gen)
    lse[0, 1, 4] = lse[1, 2, 9] = float("-inf")          # rows that have seen no key yet
    out[0, 4, 1] = out[1, 9, 2] = 0.0
    blk_lse[0, 0, 2] = blk_lse[0, 1, 1] = float("-inf")  # and blocks rows that see none (the second: both)
    blk[0, 2, 0] = blk[0, 1, 1] = 0.0
    return [x.to(device) for x in (out, lse, blk.to(block_dtype), blk_lse)]


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_merge_equals_torch_merge(seed):
    """The one-pass Triton merge (the interpreter on CPU, float32) against the torch operators' merge."""
    tm = pytest.importorskip("longscan.kernels.softmax_attention.triton_merge")
    out, lse, blk, blk_lse = _merge_case(seed, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    want_out, want_lse = out.clone(), lse.clone()
    merge_torch(want_out, want_lse, blk, blk_lse, slice(3, 11))
    tm.merge_into(out, lse, blk, blk_lse, slice(3, 11))
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    assert rel_err(out.cpu(), want_out.cpu()) <= 1e-6
    fin = torch.isfinite(want_lse)
    assert rel_err(lse[fin].cpu(), want_lse[fin].cpu()) <= 1e-6
    assert torch.equal(out[1, :3], want_out[1, :3])        # rows outside the block untouched
    with pytest.raises(ValueError, match="does not match"):
        tm.merge_into(out, lse, blk, blk_lse, slice(2, 11))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_merge_into_takes_triton_for_bf16_blocks():
    """On CUDA merge_into folds a bf16 block into float32 accumulators as the torch merge does."""
    out, lse, blk, blk_lse = _merge_case(3, torch.bfloat16, "cuda")
    want_out, want_lse = out.clone(), lse.clone()
    merge_torch(want_out, want_lse, blk, blk_lse, slice(3, 11))
    merge_into(out, lse, blk, blk_lse, slice(3, 11))
    assert rel_err(out.cpu(), want_out.cpu()) <= 1e-6
