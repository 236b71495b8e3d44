"""The fused elementwise stages of the model's step, SwiGLU's silu(a) ⊙ b and RoPE, against float64: the Triton
kernels (CPU interpreter in float32; GPU in bf16 / float32), the torch arithmetic beside them (naive.py) and
the autograd ops, forward and backward; odd lengths, rows that do not fill a tile, non-contiguous inputs,
per-row RoPE tables."""
import pytest
import torch

from harness import rel_err, run_compiled
from longscan.kernels.rope import apply_rope
from longscan.kernels.rope import naive as rope_naive
from longscan.kernels.swiglu import naive as swiglu_naive
from longscan.kernels.swiglu import swiglu
from longscan.models.rope import rope_cos_sin

triton = pytest.importorskip("triton")

from longscan.kernels.rope import triton_rope  # noqa: E402
from longscan.kernels.swiglu import triton_swiglu  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def swiglu_inputs(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen, dtype=torch.float64) * 4   # silu's curved part and both tails
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return a, b, dy


def swiglu_reference(a, b, dy):
    """float64 autograd of the textbook formula."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = torch.nn.functional.silu(a) * b
    y.backward(dy)
    return y.detach(), a.grad, b.grad


def rope_inputs(B, T, H, D, per_row, seed):
    """x, dy `[B, T, H, D]`; cos, sin from rope_cos_sin at random positions (per row: `[B, T, D]`)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    dy = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 4 * T, (B, T) if per_row else (T,), generator=gen)
    cos, sin = rope_cos_sin(pos, D, 10000.0)
    return x, cos, sin, dy


def rope_reference(x, cos, sin, dy):
    """float64 autograd of the rotation written out per pair (i, i + D/2)."""
    x = x.clone().requires_grad_()
    c, s = (cos.double()[None, :, None], sin.double()[None, :, None]) if cos.dim() == 2 else \
        (cos.double()[:, :, None], sin.double()[:, :, None])
    h = x.shape[-1] // 2
    y = torch.cat([x[..., :h] * c[..., :h] - x[..., h:] * s[..., :h],
                   x[..., h:] * c[..., h:] + x[..., :h] * s[..., h:]], dim=-1)
    y.backward(dy)
    return y.detach(), x.grad


SWIGLU_SHAPES = [(3, 37, 40), (1, 5003), (2, 1, 7)]


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_triton_kernels_float32(shape):
    a, b, dy = swiglu_inputs(shape, seed=sum(shape))
    y_ref, da_ref, db_ref = swiglu_reference(a, b, dy)
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    y = triton_swiglu.forward(f(a), f(b))
    da, db = triton_swiglu.backward(f(a), f(b), f(dy), True, True)
    for name, got, want in (("y", y, y_ref), ("da", da, da_ref), ("db", db, db_ref)):
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert rel_err(got.cpu(), want) <= 1e-6, name
    da_only, none = triton_swiglu.backward(f(a), f(b), f(dy), True, False)
    assert none is None and torch.equal(da_only, da)
    none, db_only = triton_swiglu.backward(f(a), f(b), f(dy), False, True)
    assert none is None and torch.equal(db_only, db)


def test_swiglu_op_float64_non_contiguous():
    """The op (torch arithmetic off CUDA) in float64 on transposed views is the textbook formula to round-off,
    and keeps a and b only for its backward."""
    a, b, dy = swiglu_inputs((6, 2, 33), seed=1)
    y_ref, da_ref, db_ref = swiglu_reference(a, b, dy)
    at, bt = a.transpose(0, 2).contiguous().requires_grad_(), b.transpose(0, 2).contiguous().requires_grad_()
    av, bv = at.transpose(0, 2), bt.transpose(0, 2)
    assert not av.is_contiguous()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = swiglu(av, bv)
    assert len(saved) == 2 and {id(t.untyped_storage()) for t in saved} == \
        {id(at.untyped_storage()), id(bt.untyped_storage())}
    y.backward(dy)
    assert rel_err(y.detach(), y_ref) < 1e-14
    assert rel_err(at.grad.transpose(0, 2), da_ref) < 1e-14 and rel_err(bt.grad.transpose(0, 2), db_ref) < 1e-14


def test_swiglu_naive_float32_rounds_once():
    """In bf16 the torch arithmetic computes in float32 and rounds the result once."""
    a, b, _ = swiglu_inputs((4, 64), seed=2)
    a16, b16 = a.bfloat16(), b.bfloat16()
    y = swiglu_naive.forward(a16, b16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (torch.nn.functional.silu(a16.float()) * b16.float()).bfloat16())


def test_swiglu_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"a \(2, 3\) and b \(2, 4\) must have the same shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="must have the same dtype"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))


# (B, T, H, D, per-row tables): odd T, rows that do not fill a tile, a half that is not a power of two
ROPE_CASES = [(2, 37, 3, 16, False), (2, 13, 2, 24, True), (1, 5, 1, 128, False), (3, 9, 4, 8, True)]


@pytest.mark.parametrize("B,T,H,D,per_row", ROPE_CASES)
def test_rope_triton_kernels_float32(B, T, H, D, per_row):
    x, cos, sin, dy = rope_inputs(B, T, H, D, per_row, seed=T + D)
    y_ref, dx_ref = rope_reference(x, cos, sin, dy)
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    y = triton_rope.forward(f(x), f(cos), f(sin))
    dx = triton_rope.backward(f(dy), f(cos), f(sin))
    for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref)):
        assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous(), name
        assert rel_err(got.cpu(), want) <= 1e-6, name


def test_rope_triton_non_contiguous_and_shared_row_tables():
    """x a strided view (heads and tokens swapped, every other head), tables `[1, T, D]` cut from a longer
    sequence (as the tiled mixers pass them): no copy is needed, the result is the same."""
    B, T, H, D = 2, 11, 3, 32
    gen = torch.Generator().manual_seed(7)
    big = torch.randn(B, 2 * H, T, D, generator=gen, dtype=torch.float64)
    x = big[:, ::2].transpose(1, 2)
    assert not x.is_contiguous()
    dy = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).transpose(1, 3).contiguous().transpose(1, 3)
    cos_all, sin_all = rope_cos_sin(torch.arange(3 * T), D, 10000.0)
    cos, sin = cos_all[None, T:2 * T], sin_all[None, T:2 * T]
    y_ref, dx_ref = rope_reference(x, cos[0], sin[0], dy)
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    y = triton_rope.forward(f(x), f(cos), f(sin))
    dx = triton_rope.backward(f(dy), f(cos), f(sin))
    assert rel_err(y.cpu(), y_ref) <= 1e-6 and rel_err(dx.cpu(), dx_ref) <= 1e-6


@pytest.mark.parametrize("per_row", [False, True])
def test_rope_op_float64(per_row):
    """The op (torch arithmetic off CUDA) in float64 is the rotation to round-off and keeps cos and sin only;
    the backward is the rotation by -θ."""
    x, cos, sin, dy = rope_inputs(2, 19, 3, 16, per_row, seed=4)
    cos, sin = cos.double(), sin.double()
    y_ref, dx_ref = rope_reference(x, cos, sin, dy)
    xs = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = apply_rope(xs, cos, sin)
    assert {id(t.untyped_storage()) for t in saved} == {id(cos.untyped_storage()), id(sin.untyped_storage())}
    y.backward(dy)
    assert rel_err(y.detach(), y_ref) < 1e-14 and rel_err(xs.grad, dx_ref) < 1e-14
    # rotating back by -θ (the backward applied to the output) gives x again, to the float32 tables' round-off
    assert rel_err(rope_naive.backward(y.detach(), cos, sin), x) < 1e-6


def test_rope_tables_with_a_gradient_take_autograd():
    x, cos, sin, dy = rope_inputs(1, 6, 2, 8, False, seed=5)
    c, s = cos.double().requires_grad_(), sin.double().requires_grad_()
    (apply_rope(x, c, s) * dy).sum().backward()
    cr, sr = cos.double().requires_grad_(), sin.double().requires_grad_()
    xr = x.clone()
    h = x.shape[-1] // 2
    yr = torch.cat([xr[..., :h] * cr[None, :, None, :h] - xr[..., h:] * sr[None, :, None, :h],
                    xr[..., h:] * cr[None, :, None, h:] + xr[..., :h] * sr[None, :, None, h:]], dim=-1)
    (yr * dy).sum().backward()
    assert rel_err(c.grad, cr.grad) < 1e-14 and rel_err(s.grad, sr.grad) < 1e-14


def test_rope_bad_inputs_are_refused():
    x = torch.randn(2, 5, 3, 8)
    cos, sin = rope_cos_sin(torch.arange(5), 8, 10000.0)
    with pytest.raises(ValueError, match=r"x must be \[B, T, H, D\] with D even, got \(2, 5, 3, 7\)"):
        apply_rope(torch.randn(2, 5, 3, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"cos/sin \(4, 8\) do not fit x \(2, 5, 3, 8\)"):
        apply_rope(x, cos[:4], sin[:4])
    with pytest.raises(ValueError, match=r"cos/sin \(3, 5, 8\) do not fit"):
        apply_rope(x, cos.expand(3, 5, 8), sin.expand(3, 5, 8))


GPU_TOL = {torch.bfloat16: 8e-3, torch.float32: 1e-6}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_swiglu_op(dtype):
    """The op on the GPU (the Triton kernels) in the model's dtypes, against float64 of the rounded inputs."""
    a, b, dy = (t.to(dtype).double() for t in swiglu_inputs((2, 1037, 5504), seed=11))
    y_ref, da_ref, db_ref = swiglu_reference(a, b, dy)
    ac, bc = a.to("cuda", dtype).requires_grad_(), b.to("cuda", dtype).requires_grad_()
    y = swiglu(ac, bc)
    assert y.dtype == dtype
    y.backward(dy.to("cuda", dtype))
    for name, got, want in (("y", y, y_ref), ("da", ac.grad, da_ref), ("db", bc.grad, db_ref)):
        assert got.dtype == dtype and rel_err(got.double().cpu(), want) <= GPU_TOL[dtype], name


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_row", [False, True])
def test_gpu_rope_op(dtype, per_row):
    """The op on the GPU in the model's dtypes against float64, and against the torch arithmetic (the model's
    eager form) to one rounding of the output."""
    x, cos, sin, dy = rope_inputs(2, 4099, 16, 128, per_row, seed=12)
    x, dy = x.to(dtype).double(), dy.to(dtype).double()
    y_ref, dx_ref = rope_reference(x, cos, sin, dy)
    xc = x.to("cuda", dtype).requires_grad_()
    y = apply_rope(xc, cos.cuda(), sin.cuda())
    y.backward(dy.to("cuda", dtype))
    assert y.dtype == dtype and xc.grad.dtype == dtype
    assert rel_err(y.double().cpu(), y_ref) <= GPU_TOL[dtype]
    assert rel_err(xc.grad.double().cpu(), dx_ref) <= GPU_TOL[dtype]
    eager = rope_naive.forward(x.to("cuda", dtype), cos.cuda(), sin.cuda())
    assert rel_err(y.double(), eager.double()) <= GPU_TOL[dtype]


_COMPILE = r'''
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks.tuning.kernel_resources import ptxas_report
from longscan.kernels.rope import triton_rope as tr
from longscan.kernels.swiglu import triton_swiglu as ts

def compile_sm90(fn, ptrs, consts, warps):
    """Compile as a launch at the 1B model's shapes specialises: sizes and strides divisible by 16 (but the
    token and head counts), unit strides constant; -> ptxas's registers and spills, the global access widths."""
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i64") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a] != "constexpr" and a not in ("T", "H")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    r = ptxas_report(k)
    return dict(regs=r["registers"], spills=r["spill_stores"],
                access=sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", k.asm["ptx"]))))

bf = "*bf16"
out = {}
for name, fn, ptrs, consts in (
        ("swiglu fwd", ts._fwd_kernel, dict(A=bf, B=bf, Y=bf), dict(BLOCK=ts.BLOCK)),
        ("swiglu bwd", ts._bwd_kernel, dict(A=bf, B=bf, DY=bf, DA=bf, DB=bf),
         dict(BLOCK=ts.BLOCK, NEED_DA=True, NEED_DB=True))):
    out[name] = compile_sm90(fn, ptrs, consts, ts.WARPS)
for backward in (False, True):
    out[f"rope {backward}"] = compile_sm90(
        tr._rope_kernel, dict(X=bf, C="*fp32", S="*fp32", Y=bf),
        dict(BLOCK_R=tr.TILE // 64, BLOCK_D=64, BACKWARD=backward, sxd=1, scd=1, ssd=1), tr.WARPS)
print(json.dumps(out))
'''


def test_kernels_compile_for_hopper_without_spills():
    """The kernels compiled for sm_90a (no GPU needed; the interpreter above never compiles them) at the launch
    settings: no register spills, 16-byte global loads and stores (head dim 128 for RoPE)."""
    import json
    pytest.importorskip("triton.backends.nvidia.compiler")
    proc = run_compiled("-c", _COMPILE)
    if proc.returncode and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, r in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert r["spills"] == 0 and r["regs"] <= 128, (name, r)
        assert r["access"] and all(".v4." in a for a in r["access"]), (name, r)
