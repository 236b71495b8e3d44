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
from longscan.distributed.layouts import shard
from longscan.kernels.softmax_attention import naive_attention
from longscan.parallel.softmax import softmax_attention
from longscan.parallel.softmax.common import block_plan

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


def test_ring_step_without_a_shared_document_computes_nothing():
    # 2 ranks, zigzag pieces 0..3 of 4 tokens, one document per piece: rank 1's pieces (1, 2) share no
    # document with rank 0's (0, 3) blocks, so that ring step has an empty plan; without documents it has one
    visible = frozenset({(a, a) for a in range(4)})
    assert block_plan([1, 2], [0, 3], True, visible) == []
    assert block_plan([1, 2], [0, 3], True) != []
    # a document over pieces 0-1: piece 1 sees piece 0's keys, piece 2 nothing of rank 0
    visible = visible | {(1, 0)}
    assert block_plan([1, 2], [0, 3], True, visible) == [(slice(0, 1), slice(0, 1), "full")]
