"""The softmax SP methods' accumulators: a rank's output or gradient made by one kernel call is the kernel's own
tensor (kept in its dtype, no float32 copy); a second block widens it to float32 first, so the result equals
merging or summing in float32 from the start. The kernels here return bf16 like the Triton kernel on a GPU."""
import pytest
import torch

from longscan.kernels.softmax_attention import block_forward, merge_into
from longscan.parallel.softmax import common
from longscan.parallel.softmax.common import Call, accumulate, forward_blocks, new_accumulators, widened


def _inputs(seed=0, t=8, tk=12, h=2, d=4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, t, h, d, generator=gen), torch.randn(1, tk, h, d, generator=gen),
            torch.randn(1, tk, h, d, generator=gen))


def test_one_call_keeps_the_kernel_output_and_a_second_block_merges_in_float32(monkeypatch):
    q, k, v = _inputs()
    outputs = []

    def bf16_kernel(*args, **kwargs):            # o in the inputs' 16-bit dtype, lse in float32: as Triton's
        o, lse = block_forward(*args, **kwargs)
        outputs.append((o.to(torch.bfloat16), lse))
        return outputs[-1][0], outputs[-1][1].clone()   # the merges below update a kept lse in place

    monkeypatch.setattr(common, "block_forward", bf16_kernel)
    diagonal = [Call(slice(0, 8), slice(0, 8), "causal")]        # pieces of 4 tokens: the rank's own two pieces
    out, lse = forward_blocks(None, None, q, k[:, :8], v[:, :8], diagonal, 0.5, "torch")
    assert out is outputs[0][0] and out.dtype == torch.bfloat16 and torch.equal(lse, outputs[0][1])

    # a later block (keys 8..11 seen by every query) merges in: float32, as if accumulated in float32 throughout
    later = [Call(slice(0, 8), slice(0, 4), "full")]
    out, lse = forward_blocks(out, lse, q, k[:, 8:], v[:, 8:], later, 0.5, "torch")
    want, want_lse = new_accumulators(q, v.shape[-1])
    for o_b, lse_b in outputs:
        merge_into(want, want_lse, o_b, lse_b)
    assert out.dtype == torch.float32
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_accumulate_keeps_a_whole_first_part_and_widens_before_adding():
    like = torch.zeros(1, 6, 2, 4, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(1, 6, 2, 4, generator=gen).to(torch.bfloat16) for _ in range(2))
    acc = accumulate(None, a, slice(0, 6), like)
    assert acc is a
    acc = accumulate(acc, b[:, 2:], slice(2, 6), like)
    assert acc.dtype == torch.float32
    want = a.float()
    want[:, 2:] += b[:, 2:]
    assert torch.equal(acc, want)
    # a first part over some rows only starts from float32 zeros
    part = accumulate(None, b[:, :3], slice(0, 3), like)
    assert part.dtype == torch.float32 and torch.equal(part[:, :3], b[:, :3].float()) and not part[:, 3:].any()


@pytest.mark.parametrize("dtype,compute", [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_widened(dtype, compute):
    like = torch.zeros(1, 3, 1, 2, dtype=dtype)
    assert widened(None, like).dtype == compute and not widened(None, like).any()
    x = torch.ones(1, 3, 1, 2, dtype=compute)
    assert widened(x, like) is x


def test_the_kernels_write_float32_where_later_steps_merge(monkeypatch):
    """A ring step whose block covers every row asks the kernel for the compute dtype when a later step merges into
    those rows (``RingStep.merges_follow``): no pass widening the kernel's output after it; dk, dv of a ring of
    more than one rank always (they travel and are summed in float32); without later work, the inputs' dtype."""
    from longscan.parallel.softmax import ring
    asked = []
    real_fwd, real_bwd = common.block_forward, common.block_backward
    monkeypatch.setattr(common, "block_forward",
                        lambda *a, out_dtype=None: asked.append(("o", out_dtype)) or real_fwd(*a, out_dtype=out_dtype))
    monkeypatch.setattr(common, "block_backward", lambda *a, dq_dtype=None, dkv_dtype=None: asked.append(
        ("dq", dq_dtype, dkv_dtype)) or real_bwd(*a, dq_dtype=dq_dtype, dkv_dtype=dkv_dtype))
    W, T = 4, 16
    steps = ring.ring_steps(1, W, "zigzag", True, None, T)
    assert [s.src for s in steps] == [1, 0, 3, 2] and [s.merges_follow for s in steps] == [True, True, True, False]
    assert all(s.q_docs is None and s.plan for s in steps)
    docs = common.sp_documents(torch.tensor([0, 8, 16, 24, 32, 40, 48, 56, 64]), T, W, "zigzag", True, "cpu")
    with_docs = ring.ring_steps(1, W, "zigzag", True, docs, T)
    assert [bool(s.plan) for s in with_docs] == [True, False, False, False]   # pieces of 8 = documents: own block
    assert [s.merges_follow for s in with_docs] == [False] * W
    # documents that cross piece edges: the ids come with the steps whose calls mask them, and only those
    edges = common.sp_documents(torch.tensor([0, 12, 20, 36, 64]), T, W, "zigzag", True, "cpu")
    edge_steps = ring.ring_steps(1, W, "zigzag", True, edges, T)
    for s in edge_steps:
        assert (s.q_docs is not None) == any(c.docs for c in s.plan) == (s.k_docs is not None)
        if s.q_docs is not None:
            assert torch.equal(s.k_docs, edges.of_rank(s.src, T)) and torch.equal(s.q_docs, edges.of_rank(1, T))
    assert any(s.q_docs is not None for s in edge_steps)
    q, k, v = (x.to(torch.bfloat16) for x in _inputs(t=T, tk=T))
    local, alone = steps[0], ring.ring_steps(0, 1, "zigzag", True, None, T)[0]   # alone: a ring of one rank
    ring.forward_step(None, None, q, k, v, local, 0.5, "torch")
    ring.forward_step(None, None, q, k, v, local._replace(merges_follow=False), 0.5, "torch")
    o, lse = ring.forward_step(None, None, q, k, v, alone, 0.5, "torch")
    ring.backward_step(None, q, q, k, v, o.to(q.dtype), lse, local, 0.5, "torch", True)
    ring.backward_step(None, q, q, k, v, o.to(q.dtype), lse, alone, 0.5, "torch", False)
    f32 = torch.float32
    assert asked == [("o", f32), ("o", None), ("o", None), ("dq", f32, f32), ("dq", None, None)]
