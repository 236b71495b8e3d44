"""Every softmax SP method × layout × causal × MHA/GQA × dtype, W = 1..4, against the float64 naive
reference on the whole sequence: output and dq, dk, dv of every rank's shard.

Processes are spawned once per world size (module-scoped fixture); every case runs inside the workers and
the parametrised tests assert on the cached errors.
"""
import sys

import pytest
import torch

from harness import rel_err, run_distributed, world_groups, world_results
from longscan.distributed.layouts import num_segments, segment_ids, shard
from longscan.kernels.softmax_attention import naive_attention
from longscan.parallel.softmax import softmax_attention
from longscan.parallel.softmax.common import block_plan

# "allgather_chunked": method="allgather" with chunk_heads=1 (one kv head per all-gather).
METHODS = ("ring", "allgather", "allgather_chunked", "ulysses")
LAYOUTS = ("contiguous", "zigzag")
DTYPES = {"float64": (torch.float64, 1e-5), "float32": (torch.float32, 1e-4)}
WORLDS = (1, 2, 3, 4)
T_LOCAL, B, D = 8, 2, 8

try:
    import deepspeed.sequence.layer  # noqa: F401
    HAVE_DEEPSPEED = True
except Exception:
    HAVE_DEEPSPEED = False


def heads(world, kind):
    """(Hq, Hkv): Hq = max(4, 2W) so every W divides the heads (ulysses); GQA groups 2 (or 4) q heads."""
    hq = max(4, 2 * world)
    return hq, {"mha": hq, "gqa": hq // 2, "gqa4": hq // 4}[kind]


def make_inputs(world, hq, hkv, dtype, seed, big_logits=False):
    gen = torch.Generator().manual_seed(seed)
    n = T_LOCAL * world
    q, k, v, do = (torch.randn(B, n, h, D, generator=gen, dtype=torch.float64)
                   for h in (hq, hkv, hkv, hq))
    if big_logits:
        # With scale = 1, q[..., 0] = 90 and k[..., 0] alternating 0, 1 every 4 keys: neighbouring blocks
        # of 4 keys have logits ~90 apart, so exp(lse) overflows float32 (> 88); float64 inputs get ~+750
        # on top (> 709, where float64 overflows). Only a merge in the stable form survives.
        q[..., 0] = 90.0
        base = 750.0 / 90.0 if dtype == torch.float64 else 0.0
        k[..., 0] = base + (torch.arange(n, dtype=torch.float64) // 4 % 2)[None, :, None]
    return [x.to(dtype) for x in (q, k, v, do)]


def run_case(world, method, layout, causal, kind, dtype, seed, big_logits=False, group=None):
    hq, hkv = heads(world, kind)
    q, k, v, do = make_inputs(world, hq, hkv, dtype, seed, big_logits)
    scale = 1.0 if big_logits else None
    ref = [x.detach().double().clone().requires_grad_() for x in (q, k, v)]
    o_ref, _ = naive_attention(*ref, scale, causal)
    g_ref = torch.autograd.grad(o_ref, ref, do.double())
    sh = lambda x: shard(x, 1, group, layout)  # noqa: E731
    loc = [sh(x).requires_grad_() for x in (q, k, v)]
    kw = dict(method="allgather", chunk_heads=1) if method == "allgather_chunked" else dict(method=method)
    o = softmax_attention(*loc, causal=causal, scale=scale, group=group, layout=layout, **kw)
    grads = torch.autograd.grad(o, loc, sh(do))
    assert o.dtype == dtype and o.shape == loc[0].shape
    errs = {"o": rel_err(o, sh(o_ref))}
    for name, got, want, x in zip(("dq", "dk", "dv"), grads, g_ref, loc):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        errs[name] = rel_err(got, sh(want))
    return errs


def strided_case(world, method, group=None):
    """Inputs that are non-contiguous views ([B, H, T, D] storage seen as [B, T, H, D]), as projections
    often produce: the ring's send/receive buffers and the collectives must cope."""
    hq, hkv = heads(world, "gqa")
    q, k, v, do = make_inputs(world, hq, hkv, torch.float64, seed=11)
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o_ref, _ = naive_attention(*ref, None, True)
    g_ref = torch.autograd.grad(o_ref, ref, do)
    sh = lambda x: shard(x, 1, group, "zigzag")  # noqa: E731
    leaves = [sh(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]   # [B, H, T, D]
    views = [x.transpose(1, 2) for x in leaves]
    assert not any(x.is_contiguous() for x in views)
    kw = dict(method="allgather", chunk_heads=1) if method == "allgather_chunked" else dict(method=method)
    o = softmax_attention(*views, group=group, layout="zigzag", **kw)
    grads = torch.autograd.grad(o, leaves, sh(do))
    errs = {"o": rel_err(o, sh(o_ref))}
    for name, got, want in zip(("dq", "dk", "dv"), grads, g_ref):
        errs[name] = rel_err(got.transpose(1, 2), sh(want))
    return errs


def cases(world):
    for method in METHODS:
        if method == "ulysses" and not HAVE_DEEPSPEED:
            continue
        for layout in LAYOUTS:
            for causal in (True, False):
                for kind in ("mha", "gqa"):
                    for dname in DTYPES:
                        yield (method, layout, causal, kind, dname)
        if method != "ulysses":      # a 4:1 group (Hkv = Hq/4 need not divide by W)
            yield (method, "zigzag", True, "gqa4", "float64")


def sp_worker(rank, world_size):
    """Every W of WORLDS in one spawn of the largest (the smaller ones on sub-groups) -> {W: {case: errors}}."""
    groups = world_groups(WORLDS, world_size)
    return {world: world_cases(world, group) for world, group in groups.items() if rank < world}


def world_cases(world, group):
    results = {}
    for i, (method, layout, causal, kind, dname) in enumerate(cases(world)):
        results[(method, layout, causal, kind, dname)] = run_case(
            world, method, layout, causal, kind, DTYPES[dname][0], seed=100 * world + i, group=group)
    for method in METHODS:
        if method == "ulysses" and not HAVE_DEEPSPEED:
            continue
        for layout in LAYOUTS:
            for causal in (True, False):
                for dname, (dtype, _) in DTYPES.items():
                    results[(method, layout, causal, "big_logits", dname)] = run_case(
                        world, method, layout, causal, "mha", dtype, seed=7, big_logits=True, group=group)
    for method in METHODS:
        if method == "ulysses" and not HAVE_DEEPSPEED:
            continue
        results[(method, "strided")] = strided_case(world, method, group)
    if world > 1:
        # ulysses with heads that do not divide by W: a clear error on every rank, before any collective
        q = torch.randn(1, 4, 2 * world + 1, D)
        try:
            softmax_attention(q, q[:, :, :1], q[:, :, :1], method="ulysses", group=group)
            results["ulysses_heads"] = None
        except ValueError as e:
            results["ulysses_heads"] = str(e)
    return results


_CACHE = []


@pytest.fixture(scope="module")
def sp_results():
    def get(world):
        if not _CACHE:
            _CACHE.append(run_distributed(sp_worker, max(WORLDS)))
        return world_results(_CACHE[0], world)
    return get


def _assert_all_ranks(per_rank, key, tol):
    for rank, res in enumerate(per_rank):
        for name, err in res[key].items():
            assert err <= tol, f"rank {rank}: {name} rel err {err:.2e} > {tol:.0e} for {key}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_full_sequence_reference(sp_results, world, method, layout, causal, kind, dname):
    if method == "ulysses" and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed not installed (optional extra)")
    per_rank = sp_results(world)
    assert len(per_rank) == world
    _assert_all_ranks(per_rank, (method, layout, causal, kind, dname), DTYPES[dname][1])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("method", ["ring", "allgather", "allgather_chunked"])
def test_gqa_group_of_four(sp_results, world, method):
    _assert_all_ranks(sp_results(world), (method, "zigzag", True, "gqa4", "float64"), 1e-5)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_blocks_with_logits_90_apart_merge_exactly(sp_results, world, method, layout, causal, dname):
    if method == "ulysses" and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed not installed (optional extra)")
    _assert_all_ranks(sp_results(world), (method, layout, causal, "big_logits", dname), DTYPES[dname][1])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_inputs(sp_results, world, method):
    if method == "ulysses" and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed not installed (optional extra)")
    _assert_all_ranks(sp_results(world), (method, "strided"), 1e-5)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ulysses_rejects_heads_not_divisible(sp_results, world):
    if not HAVE_DEEPSPEED:
        pytest.skip("deepspeed not installed (optional extra)")
    for rank, res in enumerate(sp_results(world)):
        msg = res["ulysses_heads"]
        assert msg is not None, f"rank {rank}: no error"
        assert "heads" in msg and f"group size {world}" in msg


# ---------------------------------------------------------------- the piece-level plan, without processes

def _plan_mask(q_segs, k_segs, causal, seg_len):
    """Boolean [len(q)·seg, len(k)·seg] of what the plan's calls let each local query see."""
    nq, nk = len(q_segs) * seg_len, len(k_segs) * seg_len
    seen = torch.zeros(nq, nk, dtype=torch.int64)
    for qs, ks, mask, _ in block_plan(q_segs, k_segs, causal, seg_len):
        n_q, n_k = qs.stop - qs.start, ks.stop - ks.start
        blk = torch.ones(n_q, n_k, dtype=torch.int64)
        if mask == "causal":
            blk = torch.tril(blk)
        seen[qs, ks] += blk
    return seen


def _true_mask(q_segs, k_segs, causal, seg_len):
    pos = lambda segs: torch.cat([torch.arange(s * seg_len, (s + 1) * seg_len) for s in segs])  # noqa: E731
    qp, kp = pos(q_segs), pos(k_segs)
    return (kp[None, :] <= qp[:, None]).long() if causal else torch.ones(len(qp), len(kp), dtype=torch.int64)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ring_and_allgather_plans_cover_exactly_the_visible_keys(world, layout, causal):
    seg_len = 2
    for rank in range(world):
        q_segs = segment_ids(rank, world, layout)
        k_lists = [segment_ids(src, world, layout) for src in range(world)]   # ring steps
        k_lists.append(list(range(num_segments(world, layout))))              # all-gather, global order
        for k_segs in k_lists:
            got = _plan_mask(q_segs, k_segs, causal, seg_len)
            assert torch.equal(got, _true_mask(q_segs, k_segs, causal, seg_len)), (rank, k_segs)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_ring_is_balanced_and_skips_masked_pairs(world):
    """Every zigzag ring step costs each rank the same (half of a T×T block), with no call on a masked pair."""
    half = 4
    for rank in range(world):
        q_segs = segment_ids(rank, world, "zigzag")
        for step in range(world):
            src = (rank - step) % world
            k_segs = segment_ids(src, world, "zigzag")
            plan = block_plan(q_segs, k_segs, True, half)
            work = 0.0
            for qs, ks, mask, _ in plan:
                n = (qs.stop - qs.start) * (ks.stop - ks.start)
                work += n / 2 if mask == "causal" else n
                if mask == "full":   # a full call must not include any masked (later) key piece
                    assert all(k_segs[b // half] < q_segs[a // half] for a in range(qs.start, qs.stop)
                               for b in range(ks.start, ks.stop))
            assert len(plan) == 1, plan
            assert work == pytest.approx(2 * half * 2 * half / 2), (rank, step, plan)


# ---------------------------------------------------------------- bad input, in this process (W = 1)

def _qkv(hq=4, hkv=2, t=8, dtype=torch.float32):
    return torch.randn(1, t, hq, D, dtype=dtype), torch.randn(1, t, hkv, D, dtype=dtype), \
        torch.randn(1, t, hkv, D, dtype=dtype)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda q, k, v: dict(q=q.numpy()), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: dict(q=q.long()), TypeError, "q must be a floating-point"),
    (lambda q, k, v: dict(k=k[0]), ValueError, "k must be 4-D"),
    (lambda q, k, v: dict(v=v.double()), TypeError, "v.dtype"),
    (lambda q, k, v: dict(k=k[:, :4], v=v[:, :4]), ValueError, "k and v"),
    (lambda q, k, v: dict(k=k[..., :4]), ValueError, "head dim"),
    (lambda q, k, v: dict(k=torch.randn(1, 8, 3, D), v=torch.randn(1, 8, 3, D)), ValueError, "kv heads"),
    (lambda q, k, v: dict(method="star"), ValueError, "method"),
    (lambda q, k, v: dict(layout="striped"), ValueError, "layout"),
    (lambda q, k, v: dict(backend="cuda_magic"), ValueError, "backend"),
    (lambda q, k, v: dict(causal="yes"), TypeError, "causal"),
    (lambda q, k, v: dict(scale=-1.0), ValueError, "scale"),
    (lambda q, k, v: dict(q=q[:, :7], k=k[:, :7], v=v[:, :7]), ValueError, "layout='zigzag' needs an even"),
    (lambda q, k, v: dict(chunk_heads=1), ValueError, "chunk_heads only applies"),
    (lambda q, k, v: dict(method="allgather", chunk_heads=0), ValueError, "chunk_heads must be"),
    (lambda q, k, v: dict(group=object()), ValueError, "group"),
])
def test_bad_input_names_the_parameter(bad, exc, match):
    q, k, v = _qkv()
    kw = dict(q=q, k=k, v=v)
    kw.update(bad(q, k, v))
    with pytest.raises(exc, match=match):
        softmax_attention(**kw)


def test_packed_documents_run_every_call_on_the_documents_backend(monkeypatch):
    """With cu_seqlens, "auto" is resolved once for documents (torch here, triton on CUDA): a call whose rows hold
    one document, which needs no document ids, runs on that backend too, not on the one "auto" picks without
    documents (cuDNN on CUDA); without cu_seqlens "auto" is resolved per call as before."""
    from longscan.parallel.softmax import common
    seen = []
    real = common.block_forward
    monkeypatch.setattr(common, "block_forward", lambda *a, **kw: seen.append(a[5]) or real(*a, **kw))
    q, k, v = _qkv()
    softmax_attention(q, k, v, cu_seqlens=torch.tensor([0, 8]))
    softmax_attention(q, k, v)
    assert seen == ["torch", "auto"]


def test_odd_local_length_is_fine_for_contiguous():
    q, k, v = _qkv(t=7)
    o = softmax_attention(q, k, v, layout="contiguous")
    assert torch.allclose(o.double(), naive_attention(q, k, v)[0], atol=1e-5)


def test_ulysses_without_deepspeed_says_how_to_install(monkeypatch):
    for name in ("deepspeed", "deepspeed.sequence", "deepspeed.sequence.layer"):
        monkeypatch.setitem(sys.modules, name, None)   # makes `import deepspeed...` raise ImportError
    q, k, v = _qkv()
    with pytest.raises(ImportError, match="pip install deepspeed"):
        softmax_attention(q, k, v, method="ulysses")
