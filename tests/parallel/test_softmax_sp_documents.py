"""Softmax SP with packed documents: every method × layout, W = 1..4, against each document attended on
its own on one device (float64), output and dq, dk, dv of every rank's shard.

Document sets per W: documents ending exactly on rank and piece boundaries, single-token documents, one
document spanning every rank, random lengths. Processes are spawned once per world size.
"""
import importlib.util
import os

import pytest
import torch

from harness import rel_err, run_distributed, world_groups, world_results
from longscan.distributed.documents import visible_blocks
from longscan.distributed.layouts import num_segments, segment_ids, shard
from longscan.kernels.softmax_attention import naive_attention
from longscan.parallel.softmax import softmax_attention
from longscan.parallel.softmax.common import Call, block_plan

pytestmark = pytest.mark.interpreted   # its workers run the Triton kernels in the CPU interpreter

try:
    import deepspeed.sequence.layer  # noqa: F401
    HAVE_DEEPSPEED = True
except Exception:
    HAVE_DEEPSPEED = False

HAVE_TRITON = importlib.util.find_spec("triton") is not None

WORLDS = (1, 2, 3, 4)
T_LOCAL, D = 8, 8
METHODS = ("ring", "allgather", "ulysses")
LAYOUTS = ("contiguous", "zigzag")


def doc_sets(world):
    n = T_LOCAL * world
    gen = torch.Generator().manual_seed(world)
    rand, left = [], n
    while left:
        rand.append(min(left, int(torch.randint(1, 6, (1,), generator=gen))))
        left -= rand[-1]
    return {
        "rank_ends": [T_LOCAL] * world,                      # each rank's tokens one document
        "piece_ends": [T_LOCAL // 2] * (2 * world),          # each zigzag piece one document
        "singles": [1, 1, 1] + [n - 6] + [1, 1, 1] if n > 6 else [1] * n,
        "spanning": [1, n - 2, 1],                           # one document over every rank
        "random": rand,
    }


def per_document(q, k, v, do, lengths, causal):
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    outs, a = [], 0
    for n in lengths:
        outs.append(naive_attention(ref[0][:, a:a + n], ref[1][:, a:a + n], ref[2][:, a:a + n], None, causal)[0])
        a += n
    o = torch.cat(outs, 1)
    return o.detach(), torch.autograd.grad(o, ref, do)


def run_case(world, method, layout, causal, lengths, seed, dtype=torch.float64, backend="auto", d=D, group=None):
    hq = max(4, 2 * world)
    hkv = hq // 2
    gen = torch.Generator().manual_seed(seed)
    n = T_LOCAL * world
    q, k, v, do = (torch.randn(1, n, h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    o_ref, g_ref = per_document(q, k, v, do, lengths, causal)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    sh = lambda x: shard(x, 1, group, layout)  # noqa: E731
    loc = [sh(x).to(dtype).requires_grad_() for x in (q, k, v)]
    o = softmax_attention(*loc, causal=causal, method=method, group=group, layout=layout, backend=backend,
                          cu_seqlens=cu)
    grads = torch.autograd.grad(o, loc, sh(do).to(dtype))
    errs = {"o": rel_err(o, sh(o_ref))}
    for name, got, want in zip(("dq", "dk", "dv"), grads, g_ref):
        errs[name] = rel_err(got, sh(want))
    return errs


def worker(rank, world_size):
    """Every W of WORLDS in one spawn of the largest (the smaller ones on sub-groups) -> {W: {case: errors}}."""
    # the Triton kernel runs in the CPU interpreter (float32); set before its module is first imported
    os.environ["TRITON_INTERPRET"] = "1"
    groups = world_groups(WORLDS, world_size)
    return {world: world_cases(world, group) for world, group in groups.items() if rank < world}


def world_cases(world, group):
    out = {}
    for method in METHODS:
        if method == "ulysses" and not HAVE_DEEPSPEED:
            continue
        for layout in LAYOUTS:
            for name, lengths in doc_sets(world).items():
                out[(method, layout, True, name)] = run_case(world, method, layout, True, lengths, seed=world,
                                                             group=group)
            out[(method, layout, False, "random")] = run_case(world, method, layout, False,
                                                              doc_sets(world)["random"], seed=world + 1, group=group)
    if world <= 2 and HAVE_TRITON:                  # the interpreter is slow: two ring sizes are enough
        out[("ring", "zigzag", True, "random", "triton")] = run_case(
            world, "ring", "zigzag", True, doc_sets(world)["random"], seed=3, dtype=torch.float32,
            backend="triton", d=16, group=group)
    if world > 1:
        q = torch.randn(1, T_LOCAL, 2, D)
        try:
            softmax_attention(q, q, q, group=group, cu_seqlens=torch.tensor([0, T_LOCAL]))
            out["bad_cu"] = None
        except ValueError as e:
            out["bad_cu"] = str(e)
    return out


_CACHE = []


@pytest.fixture(scope="module")
def results():
    def get(world):
        if not _CACHE:
            _CACHE.append(run_distributed(worker, max(WORLDS)))
        return world_results(_CACHE[0], world)
    return get


def _check(per_rank, key, tol):
    for rank, res in enumerate(per_rank):
        for name, err in res[key].items():
            assert err <= tol, f"rank {rank}: {name} rel err {err:.2e} > {tol:.0e} for {key}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("docs", ["rank_ends", "piece_ends", "singles", "spanning", "random"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_causal_matches_per_document_reference(results, world, method, layout, docs):
    if method == "ulysses" and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed not installed (optional extra)")
    _check(results(world), (method, layout, True, docs), 1e-10)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_full_mask_matches_per_document_reference(results, world, method, layout):
    if method == "ulysses" and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed not installed (optional extra)")
    _check(results(world), (method, layout, False, "random"), 1e-10)


@pytest.mark.parametrize("world", [1, 2])
def test_triton_kernel_in_the_ring(results, world):
    pytest.importorskip("triton")
    _check(results(world), ("ring", "zigzag", True, "random", "triton"), 1e-4)


@pytest.mark.parametrize("world", [2, 3])
def test_cu_seqlens_must_cover_the_global_sequence(results, world):
    for rank, res in enumerate(results(world)):
        assert res["bad_cu"] is not None and f"global length {T_LOCAL * world}" in res["bad_cu"], rank


def _blocks(lengths, n_pieces, seg_len, causal=True):
    return visible_blocks(torch.tensor([0] + lengths).cumsum(0), n_pieces, seg_len, causal)


def test_ring_step_without_a_shared_document_computes_nothing():
    # 2 ranks, zigzag pieces 0..3 of 4 tokens, one document per piece: rank 1's pieces (1, 2) share no
    # document with rank 0's (0, 3) blocks, so that ring step has an empty plan; without documents it has one
    assert block_plan([1, 2], [0, 3], True, 4, _blocks([4, 4, 4, 4], 4, 4)) == []
    assert block_plan([1, 2], [0, 3], True, 4) != []
    # a document over pieces 0-1: piece 1 sees all of piece 0, with no document mask; piece 2 nothing of rank 0
    assert block_plan([1, 2], [0, 3], True, 4, _blocks([8, 4, 4], 4, 4)) == [
        Call(slice(0, 4), slice(0, 4), "full", False)]
    # a document over tokens 2-5: piece 1's first two rows see piece 0's last two, nothing else
    assert block_plan([1, 2], [0, 3], True, 4, _blocks([2, 4, 6, 4], 4, 4)) == [
        Call(slice(0, 2), slice(2, 4), "full", False)]


def _seen_by_plan(plan, q_pos, k_pos, doc_of):
    """How many times the plan's calls let each (local query, key) pair through `[Tq, Tk]`."""
    seen = torch.zeros(len(q_pos), len(k_pos), dtype=torch.int64)
    for call in plan:
        qp, kp = q_pos[call.q], k_pos[call.k]
        ok = torch.ones(len(qp), len(kp), dtype=torch.bool)
        if call.mask == "causal":
            ok &= torch.tril(torch.ones_like(ok))
        if call.docs:
            ok &= doc_of[qp][:, None] == doc_of[kp][None, :]
        seen[call.q, call.k] += ok.long()
    return seen


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_plans_with_documents_cover_exactly_the_visible_pairs(world, layout, causal):
    """Over random documents, every ring step's and the all-gather's plan lets each visible (query, key) pair
    through exactly once and no other, though its calls cover only the shared documents' rows and take
    document ids only where two documents meet."""
    gen = torch.Generator().manual_seed(world + 10 * causal)
    n = num_segments(world, layout)
    for seg_len, max_len in ((3, 2), (4, 7), (5, 23)):
        total = n * seg_len
        lens, left = [], total
        while left:
            lens.append(min(int(torch.randint(1, max_len + 1, (1,), generator=gen)), left))
            left -= lens[-1]
        cu = torch.tensor([0] + lens).cumsum(0)
        doc_of = torch.searchsorted(cu[1:], torch.arange(total), right=True)
        blocks = visible_blocks(cu, n, seg_len, causal)
        pos = lambda segs: torch.cat([torch.arange(s * seg_len, (s + 1) * seg_len) for s in segs])  # noqa: E731
        for rank in range(world):
            q_segs = segment_ids(rank, world, layout)
            k_lists = [segment_ids(src, world, layout) for src in range(world)] + [list(range(n))]
            for k_segs in k_lists:
                qp, kp = pos(q_segs), pos(k_segs)
                want = doc_of[qp][:, None] == doc_of[kp][None, :]
                if causal:
                    want &= kp[None, :] <= qp[:, None]
                got = _seen_by_plan(block_plan(q_segs, k_segs, causal, seg_len, blocks), qp, kp, doc_of)
                assert torch.equal(got, want.long()), (seg_len, lens, rank, k_segs)
