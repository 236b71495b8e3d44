"""RMSNorm kernels against float64: the Triton kernels (CPU interpreter in float32; GPU in bf16 / float32) and
the autograd op, whole-vector and per-group weights, rows and widths that do not fill a tile."""
import pytest
import torch

from harness import rel_err
from longscan.kernels.norm import naive, rms_norm

triton = pytest.importorskip("triton")

from longscan.kernels.norm import triton_rms  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# (x shape, weight shape): odd widths, rows not a multiple of the tile, per-head weights
CASES = [((2, 37, 96), (96,)), ((1, 33, 3, 64), (3, 64)), ((3, 5, 2048), (2048,)), ((1, 1, 7), (7,))]


def inputs(shape, wshape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 0.5
    w = torch.randn(wshape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, w, dy


def reference(x, w, dy, eps=1e-5):
    """float64 autograd of the textbook formula."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape,wshape", CASES)
def test_triton_kernels_float32(shape, wshape):
    x, w, dy = inputs(shape, wshape, seed=len(shape) + shape[-1])
    y_ref, dx_ref, dw_ref = reference(x, w, dy)
    G = 1 if len(wshape) == 1 else wshape[0]
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    y, r = triton_rms.forward(f(x), f(w), 1e-5, torch.float32, G)
    dx, dw = triton_rms.backward(f(x), f(w), r, f(dy), G, True, True)
    for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert rel_err(got.cpu(), want) <= 1e-5, name
    dx_only, none = triton_rms.backward(f(x), f(w), r, f(dy), G, True, False)
    assert none is None and torch.equal(dx_only, dx)


@pytest.mark.parametrize("shape,wshape", CASES[:2])
def test_autograd_op_float64(shape, wshape):
    """The op (torch arithmetic off CUDA) in float64 is the textbook formula to round-off, and its out_dtype
    is what it returns."""
    x, w, dy = inputs(shape, wshape, seed=3)
    y_ref, dx_ref, dw_ref = reference(x, w, dy)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(xs, ws, 1e-5)
    y.backward(dy)
    assert rel_err(y.detach(), y_ref) < 1e-12 and rel_err(xs.grad, dx_ref) < 1e-12 and rel_err(ws.grad, dw_ref) < 1e-12
    assert rms_norm(x.float(), w.float(), 1e-5, torch.bfloat16).dtype == torch.bfloat16


def test_naive_matches_kernel_arithmetic():
    x, w, dy = inputs((4, 6, 40), (40,), seed=5)
    y, r = naive.forward(x, w, 1e-5, torch.float64, 1)
    dx, dw = naive.backward(x, w, r, dy, 1, True, True)
    y_ref, dx_ref, dw_ref = reference(x, w, dy)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(dx, dx_ref) < 1e-12 and rel_err(dw, dw_ref) < 1e-12


def test_weight_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"weight \(3, 64\) does not fit x \(2, 5, 4, 64\)"):
        rms_norm(torch.randn(2, 5, 4, 64), torch.ones(3, 64), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 5, 64), torch.ones(32), 1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,out_dtype,tol", [(torch.float32, torch.bfloat16, 8e-3), (torch.bfloat16, torch.bfloat16, 8e-3),
                                                 (torch.float32, torch.float32, 1e-5)])
@pytest.mark.parametrize("shape,wshape", [((1, 4099, 2048), (2048,)), ((2, 1000, 16, 128), (16, 128))])
def test_gpu_op(dtype, out_dtype, tol, shape, wshape):
    """The autograd op on the GPU (the Triton kernels) in the model's dtypes, against float64."""
    x, w, dy = inputs(shape, wshape, seed=11)
    x, dy = x.to(dtype).double(), dy.to(out_dtype).double()   # the reference sees the rounded inputs
    y_ref, dx_ref, dw_ref = reference(x, w, dy)
    xs = x.to("cuda", dtype).requires_grad_()
    ws = w.to("cuda", torch.float32).requires_grad_()
    y = rms_norm(xs, ws, 1e-5, out_dtype)
    assert y.dtype == out_dtype
    y.backward(dy.to("cuda", out_dtype))
    assert xs.grad.dtype == dtype and ws.grad.dtype == torch.float32
    for name, got, want in (("y", y, y_ref), ("dx", xs.grad, dx_ref), ("dw", ws.grad, dw_ref)):
        assert rel_err(got.double().cpu(), want) <= tol, name
