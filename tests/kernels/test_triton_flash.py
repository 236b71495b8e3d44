"""Triton flash attention against plain float64 softmax math (CPU interpreter in float32; GPU in bf16/fp32)."""
import math

import pytest
import torch

from harness import rel_err

triton = pytest.importorskip("triton")

from longscan.kernels.softmax_attention import triton_flash as tf  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def reference(q, k, v, scale, causal, do):
    """o, lse and (dq, dk, dv) in float64 by autograd over softmax(q kᵀ·scale) v with kv heads repeated."""
    q, k, v = (x.double().cpu().requires_grad_() for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bthd,bshd->bhts", q, kr) * scale
    if causal:
        T = q.shape[1]
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), vr)
    grads = torch.autograd.grad(o, (q, k, v), do.double().cpu())
    return o.detach(), lse.detach(), grads


def check(B, T, Tk, HQ, HKV, D, causal, dtype, tol, seed, dkdv_parts=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=gen)
    k = torch.randn(B, Tk, HKV, D, generator=gen)
    v = torch.randn(B, Tk, HKV, D, generator=gen)
    do = torch.randn(B, T, HQ, D, generator=gen)
    scale = 1 / math.sqrt(D)
    o_ref, lse_ref, g_ref = reference(q, k, v, scale, causal, do)
    q, k, v, do = (x.to(DEV, dtype) for x in (q, k, v, do))
    o, lse = tf.flash_attn_forward(q, k, v, scale, causal)
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, HQ, T)
    assert rel_err(o.cpu(), o_ref) <= tol
    assert rel_err(lse.cpu(), lse_ref) <= tol
    grads = tf.flash_attn_backward(do, q, k, v, o, lse, scale, causal, dkdv_parts=dkdv_parts)
    for name, got, want in zip(("dq", "dk", "dv"), grads, g_ref):
        assert got.shape == want.shape and got.dtype == dtype
        err = rel_err(got.cpu(), want)
        assert err <= tol, f"{name}: {err:.2e}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("HQ,HKV", [(2, 2), (4, 2)])     # MHA and GQA
@pytest.mark.parametrize("T", [45, 64])                 # 45: not a multiple of the block
def test_interpreter_fp32(T, HQ, HKV, causal):
    check(1, T, T, HQ, HKV, 16, causal, torch.float32, 1e-4, seed=T + HQ)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("parts", [1, 2, 4])
def test_dkdv_kernel_split_over_the_group(parts, causal):
    """The dK/dV launch with each GQA group's 4 q-heads in 1, 2 or 4 parts (summed after it in float32)."""
    check(2, 45, 45 if causal else 70, 8, 2, 16, causal, torch.float32, 1e-4, seed=parts, dkdv_parts=parts)


def test_dkdv_split_with_documents_and_its_rule():
    """With document ids the parts add up to the unsplit launch's gradients; the rule takes the fewest parts that
    give twice as many programs as multiprocessors; a part count that does not divide the group is refused."""
    from longscan.kernels.softmax_attention import BlockDocs
    gen = torch.Generator().manual_seed(5)
    q, do = (torch.randn(1, 40, 4, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 40, 1, 16, generator=gen) for _ in range(2))
    ids = torch.tensor([0] * 13 + [1] * 20 + [2] * 7)
    docs = BlockDocs(ids, ids)
    o, lse = tf.flash_attn_forward(q, k, v, 0.25, True, docs)
    one = tf.flash_attn_backward(do, q, k, v, o, lse, 0.25, True, docs, dkdv_parts=1)
    four = tf.flash_attn_backward(do, q, k, v, o, lse, 0.25, True, docs, dkdv_parts=4)
    for a, b in zip(one, four):
        assert rel_err(b, a) <= 1e-6
    assert tf.dkdv_splits(64, 4, 132) == 4 and tf.dkdv_splits(88, 4, 132) == 4
    assert tf.dkdv_splits(100, 4, 132) == 4 and tf.dkdv_splits(140, 4, 132) == 2
    assert tf.dkdv_splits(1024, 4, 132) == 1 and tf.dkdv_splits(10, 1, 132) == 1
    assert tf.dkdv_splits(10, 6, 132) == 6 and tf.dkdv_splits(50, 6, 132) == 6 and tf.dkdv_splits(90, 6, 132) == 3
    for bad in (3, 0):
        with pytest.raises(ValueError, match="dkdv_parts must be a divisor of Hq // Hkv = 4"):
            tf.flash_attn_backward(do, q, k, v, o, lse, 0.25, True, dkdv_parts=bad)


def test_full_mask_unequal_lengths():
    """The ring's off-diagonal block pairs: full mask, Tq != Tk."""
    check(2, 33, 50, 2, 1, 32, False, torch.float32, 1e-4, seed=1)


# (dk/dv kernel, dq kernel) block shapes for the interpreter: BM < BN, BM > BN, and a 4:1 ratio each way
BLOCKS = [((16, 32), (32, 16)), ((32, 16), (16, 32)), ((16, 64), (64, 16))]


def use_blocks(monkeypatch, kv, qb):
    """Point the interpreter's backward settings at these blocks (restored after the test)."""
    monkeypatch.setitem(tf.BWD_CONFIG_INTERPRET, "dkdv", dict(BM=kv[0], BN=kv[1], num_warps=4, num_stages=1))
    monkeypatch.setitem(tf.BWD_CONFIG_INTERPRET, "dq", dict(BM=qb[0], BN=qb[1], num_warps=4, num_stages=1))
    got = tf._bwd_cfg(16, torch.float32)
    assert (got[0]["BM"], got[0]["BN"], got[1]["BM"], got[1]["BN"]) == (*kv, *qb)


@pytest.mark.parametrize("kv,qb", BLOCKS)
@pytest.mark.parametrize("causal", [True, False])
def test_bwd_block_configs(monkeypatch, kv, qb, causal):
    """Non-default backward blocks, GQA, T=100 (no multiple of any block; diagonal and mask-free blocks)."""
    use_blocks(monkeypatch, kv, qb)
    check(1, 100, 100, 4, 2, 16, causal, torch.float32, 1e-4, seed=kv[0] + qb[0] + causal)


@pytest.mark.parametrize("kv,qb", BLOCKS)
def test_bwd_block_configs_full_unequal(monkeypatch, kv, qb):
    """Full mask with Tq != Tk (neither a multiple of the blocks), GQA."""
    use_blocks(monkeypatch, kv, qb)
    check(1, 37, 75, 4, 1, 16, False, torch.float32, 1e-4, seed=kv[1])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # masked-out p, rows never stored
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("causal", [True, False])
def test_bwd_very_negative_lse(monkeypatch, causal):
    """Every logit near -150: exp2(-lse·log2 e) overflows float32, so the zero-padded keys of a partial last
    block must be masked out of p, or dq turns nan."""
    use_blocks(monkeypatch, (16, 32), (32, 16))
    gen = torch.Generator().manual_seed(3)
    B, T, H, D = 1, 40, 2, 16
    q = 3 + 0.3 * torch.randn(B, T, H, D, generator=gen)
    k = -3 + 0.3 * torch.randn(B, T, H, D, generator=gen)
    v, do = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, H, D, generator=gen)
    _, lse_ref, g_ref = reference(q, k, v, 1.0, causal, do)
    assert lse_ref.max() < -100
    o, lse = tf.flash_attn_forward(q, k, v, 1.0, causal)
    assert rel_err(lse, lse_ref) <= 1e-5
    for name, got, want in zip(("dq", "dk", "dv"), tf.flash_attn_backward(do, q, k, v, o, lse, 1.0, causal), g_ref):
        err = rel_err(got, want)
        assert err <= 1e-4, f"{name}: {err:.2e}"


def test_clear_errors():
    q = torch.randn(1, 8, 2, 16, device=DEV)
    with pytest.raises(TypeError, match="supports"):
        tf.flash_attn_forward(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="head dims"):
        w = torch.randn(1, 8, 2, 24, device=DEV)
        tf.flash_attn_forward(w, w, w)
    with pytest.raises(ValueError, match="Tq == Tk"):
        tf.flash_attn_forward(q, q[:, :4], q[:, :4], causal=True)
    with pytest.raises(ValueError, match="multiple"):
        tf.flash_attn_forward(torch.randn(1, 8, 3, 16, device=DEV), q, q)


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu(D, causal, dtype, tol):
    check(2, 1000, 1000, 8, 2, D, causal, dtype, tol, seed=D)       # a small launch: dK/dV split in parts
    check(2, 1000, 1000, 8, 2, D, causal, dtype, tol, seed=D, dkdv_parts=1)
    if not causal:
        check(1, 300, 700, 4, 4, D, False, dtype, tol, seed=D + 1)


@pytest.mark.parametrize("causal", [True, False])
def test_float32_outputs_round_to_the_default_ones(causal):
    """out_dtype / dq_dtype / dkv_dtype = float32 (a ring's blocks that later blocks merge into): the kernels write
    their float32 sums, which round to exactly what they write in the inputs' dtype by default (half inputs:
    float16 in the interpreter, bf16 on a GPU)."""
    dtype = torch.bfloat16 if CUDA else torch.float16
    gen = torch.Generator().manual_seed(3)
    q, do = (torch.randn(1, 70, 4, 16, generator=gen).to(DEV, dtype) for _ in range(2))
    k, v = (torch.randn(1, 70, 2, 16, generator=gen).to(DEV, dtype) for _ in range(2))
    o, lse = tf.flash_attn_forward(q, k, v, None, causal)
    o32, lse32 = tf.flash_attn_forward(q, k, v, None, causal, out_dtype=torch.float32)
    assert o32.dtype == torch.float32 and torch.equal(o32.to(dtype), o) and torch.equal(lse32, lse)
    assert not torch.equal(o32, o.float())                 # the float32 sums, not the rounded ones widened
    grads = tf.flash_attn_backward(do, q, k, v, o, lse, None, causal)
    wide = tf.flash_attn_backward(do, q, k, v, o, lse, None, causal, dq_dtype=torch.float32, dkv_dtype=torch.float32)
    for name, got, want in zip(("dq", "dk", "dv"), wide, grads):
        assert got.dtype == torch.float32 and torch.equal(got.to(dtype), want), name
    dq, dk, dv = tf.flash_attn_backward(do, q, k, v, o, lse, None, causal, dkv_dtype=torch.float32)
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype, torch.float32, torch.float32)
