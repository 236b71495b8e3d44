"""Packed documents (cu_seqlens) through linear SP: every method × layout × decay kind, W = 1..4 (sub-groups
of one 4-process spawn), on the torch backend (and the naive one for ZeCO): output and the gradients of q, k,
v, g / g_gamma against each document run alone through the float64 recurrence on one device."""
import pytest
import torch
import torch.distributed as dist

from harness import rel_err, run_distributed
from linear_cases import DECAYS, make_inputs, random_offsets
from longscan.distributed.documents import global_positions
from longscan.kernels.linear_attention import naive_recurrent_linear_attention
from longscan.parallel import linear_attention, shard

METHODS = ("zeco", "lasp2", "lasp1")
LAYOUTS = ("contiguous", "zigzag")
WORLDS = (1, 2, 3, 4)
B, H, K, V, T_LOCAL = 1, 2, 4, 3, 8
PIECE = T_LOCAL // 2   # a zigzag piece; a contiguous rank's piece is two of them
RUNS = [(m, "torch") for m in METHODS] + [("zeco", "naive")]


def documents(world: int) -> dict:
    """Offsets into the global sequence of T_LOCAL·world tokens."""
    T = T_LOCAL * world
    return {
        # every piece edge (so every rank edge in both layouts) is a boundary; a one-token first document
        "edges": [0, 1] + list(range(PIECE, T + 1, PIECE)),
        # one document over every rank (both layouts), then two one-token documents
        "span": [0, 3, T - 2, T - 1, T],
        "random": random_offsets(T, world),
    }


def each_document_alone(x, cu, do):
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None and n != "initial_state"}
    g, g_gamma = leaves.get("g"), leaves.get("g_gamma")
    o = torch.cat([naive_recurrent_linear_attention(leaves["q"][:, a:b], leaves["k"][:, a:b], leaves["v"][:, a:b],
                                                    g[:, a:b] if g is not None else None, g_gamma)[0]
                   for a, b in zip(cu[:-1], cu[1:])], 1)
    names = list(leaves)
    return o, dict(zip(names, torch.autograd.grad(o, [leaves[n] for n in names], do)))


def case(group, world, decay, cu, method, layout, backend, ref):
    x, do, o_ref, g_ref = ref

    def sh(t):
        return shard(t, 1, group, layout)

    local = {n: (t if n == "g_gamma" else sh(t)).clone().requires_grad_() for n, t in x.items()
             if t is not None and n != "initial_state"}
    before = {n: t.detach().clone() for n, t in local.items()}
    o, s = linear_attention(local["q"], local["k"], local["v"], local.get("g"), local.get("g_gamma"),
                            method=method, group=group, layout=layout, n_blocks=2, backend=backend,
                            cu_seqlens=torch.tensor(cu))
    names = list(local)
    grads = torch.autograd.grad(o, [local[n] for n in names], sh(do))
    unchanged = all(torch.equal(local[n].detach(), before[n]) for n in names)
    finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(d).all()) for d in grads) and s is None
    errs = {"o": rel_err(o, sh(o_ref))}
    for n, got in zip(names, grads):
        if n == "g_gamma":     # replicated: the gradient summed over the group's ranks
            got = got.clone()
            dist.all_reduce(got, group=group)
            errs["dg_gamma"] = rel_err(got, g_ref[n])
        else:
            errs["d" + n] = rel_err(got, sh(g_ref[n]))
    return errs, finite and unchanged


def worker(rank, world_size):
    out = {}
    for world in WORLDS:
        group = dist.new_group(list(range(world)))   # every rank takes part in creating every group
        if rank >= world:
            continue
        for decay in DECAYS:
            x = make_inputs(decay, B, T_LOCAL * world, H, K, V, torch.float64, seed=world * 10 + DECAYS.index(decay))
            do = torch.randn(B, T_LOCAL * world, H, V, generator=torch.Generator().manual_seed(7),
                             dtype=torch.float64)
            for name, cu in documents(world).items():
                ref = (x, do) + each_document_alone(x, cu, do)
                for method, backend in RUNS:
                    for layout in LAYOUTS:
                        out[(world, decay, name, method, backend, layout)] = case(group, world, decay, cu, method,
                                                                                 layout, backend, ref)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(worker, max(WORLDS))


@pytest.mark.parametrize("docs", ["edges", "span", "random"])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method,backend", RUNS, ids=[f"{m}-{b}" for m, b in RUNS])
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"W{w}")
def test_documents_sp_match_each_document_alone(results, world, method, backend, layout, decay, docs):
    expected = {"o", "dq", "dk", "dv"} | ({"dg"} if decay in ("g_scalar", "g_per_key") else
                                          {"dg_gamma"} if decay == "g_gamma" else set())
    for rank in range(world):
        errs, ok = results[rank][(world, decay, docs, method, backend, layout)]
        assert ok, f"rank {rank}: non-finite results, a final state, or inputs changed in place"
        assert set(errs) == expected
        bad = {k: v for k, v in errs.items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"


def test_documents_cover_the_edges():
    """The cases hold what they claim: a one-token document, every piece edge a boundary, a document over
    every rank's pieces in both layouts."""
    for world in WORLDS:
        T = T_LOCAL * world
        docs = documents(world)
        for name, cu in docs.items():
            assert cu[0] == 0 and cu[-1] == T and all(a < b for a, b in zip(cu, cu[1:]))
            assert name == "random" or any(b - a == 1 for a, b in zip(cu, cu[1:]))
        assert set(range(0, T + 1, PIECE)) <= set(docs["edges"])
        a, b = docs["span"][1:3]
        for layout in LAYOUTS:
            for rank in range(world):
                pos = global_positions(T_LOCAL, world, rank, layout)
                assert ((pos >= a) & (pos < b)).any(), (layout, rank)


def test_documents_refused_before_any_collective():
    """Bad inputs fail on the calling rank with an error naming the parameter (one process, no group)."""
    x = make_inputs("g_scalar", 1, 16, H, K, V, torch.float64, seed=1)
    cu = torch.tensor([0, 5, 16])
    args = (x["q"], x["k"], x["v"], x["g"])
    with pytest.raises(ValueError, match="needs backend='torch', 'naive' or 'triton'.*got backend='fla'"):
        linear_attention(*args, backend="fla", cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_state with cu_seqlens of 2 documents must be one state per document"):
        linear_attention(*args, initial_state=x["initial_state"][:1], backend="torch", cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at the global length 16"):
        linear_attention(*args, backend="torch", cu_seqlens=torch.tensor([0, 5, 15]))
    x2 = make_inputs("g_scalar", 2, 16, H, K, V, torch.float64, seed=1)
    with pytest.raises(ValueError, match="q must be \\[1, T, H, K\\], got batch 2"):
        linear_attention(x2["q"], x2["k"], x2["v"], x2["g"], backend="torch", cu_seqlens=cu)
