"""Per-document initial and final states `[N, H, K, V]` with packed documents through linear SP: every method ×
layout × decay kind, W = 1..4 (sub-groups of one 4-process spawn), on the torch backend: outputs, the final states
(on every rank) and the gradients of q, k, v, g / g_gamma and the initial states (summed over the ranks, as for
the replicated unpacked initial_state) against each document run alone from its own initial state through the
float64 recurrence on one device."""
import pytest
import torch
import torch.distributed as dist

from harness import rel_err, run_distributed
from linear_cases import DECAYS, each_document_alone, make_inputs, random_offsets
from longscan.parallel import linear_attention, shard

pytestmark = pytest.mark.interpreted   # its workers run the Triton kernels in the CPU interpreter

METHODS = ("zeco", "lasp2", "lasp1")
LAYOUTS = ("contiguous", "zigzag")
WORLDS = (1, 2, 3, 4)
H, K, V, T_LOCAL = 2, 4, 3, 8
PIECE = T_LOCAL // 2   # a zigzag piece; a contiguous rank's piece is two of them
STATES = {"both": (True, True), "initial": (True, False), "final": (False, True)}


def documents(world: int) -> dict:
    """Offsets into the global sequence of T_LOCAL·world tokens."""
    T = T_LOCAL * world
    return {
        # every piece edge (so every rank edge in both layouts) is a boundary; a one-token first document
        "edges": [0, 1] + list(range(PIECE, T + 1, PIECE)),
        # a document over every rank (both layouts) between two short ones, then one-token documents
        "span": [0, 3, T - 2, T - 1, T],
        "random": random_offsets(T, world + 100),
        "whole": [0, T],
    }


def case(group, world, x, h0, cu, do, dfinal, states, method, layout, backend="torch", dtype=torch.float64,
         **kw):
    use_h0, want_final = STATES[states]
    o_ref, s_ref, g_ref = each_document_alone(x, h0, cu, do, dfinal, use_h0, want_final)

    def sh(t):
        return shard(t, 1, group, layout)

    local = {n: (t if n == "g_gamma" else sh(t)).to(dtype).clone().requires_grad_() for n, t in x.items()}
    if use_h0:
        local["initial_state"] = h0.to(dtype).clone().requires_grad_()
    o, s = linear_attention(local["q"], local["k"], local["v"], local.get("g"), local.get("g_gamma"),
                            initial_state=local.get("initial_state"), output_final_state=want_final,
                            method=method, group=group, layout=layout, n_blocks=2, backend=backend,
                            cu_seqlens=torch.tensor(cu), **kw)
    # every rank's copy of the final states is an output: the global loss takes their mean
    loss = (o * sh(do).to(o.dtype)).sum() + ((s * dfinal.to(s.dtype)).sum() / world if want_final else 0)
    names = list(local)
    grads = torch.autograd.grad(loss, [local[n] for n in names])
    finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(d).all()) for d in grads)
    errs = {"o": rel_err(o, sh(o_ref))}
    if want_final:
        errs["final"] = rel_err(s, s_ref)
    elif s is not None:
        finite = False
    for n, got in zip(names, grads):
        if n in ("g_gamma", "initial_state"):     # replicated: the gradient summed over the group's ranks
            got = got.clone()
            dist.all_reduce(got, group=group)
            errs["d" + n] = rel_err(got, g_ref[n])
        else:
            errs["d" + n] = rel_err(got, sh(g_ref[n]))
    return errs, finite


def runs(world):
    """(states, method, layout) of every case: both states everywhere; one state alone for each method in one
    layout each (the paths without the injected leaving states, and without the final states)."""
    out = [("both", m, lay) for m in METHODS for lay in LAYOUTS]
    out += [("initial", "zeco", "zigzag"), ("initial", "lasp2", "contiguous"), ("final", "lasp1", "zigzag"),
            ("final", "lasp2", "zigzag")]
    return out


def worker(rank, world_size):
    out = {}
    for world in WORLDS:
        group = dist.new_group(list(range(world)))   # every rank takes part in creating every group
        if rank >= world:
            continue
        T = T_LOCAL * world
        for decay in DECAYS:
            x = make_inputs(decay, 1, T, H, K, V, torch.float64, seed=world * 10 + DECAYS.index(decay))
            x = {n: t for n, t in x.items() if t is not None and n != "initial_state"}
            gen = torch.Generator().manual_seed(7)
            do = torch.randn(1, T, H, V, generator=gen, dtype=torch.float64)
            for name, cu in documents(world).items():
                n = len(cu) - 1
                h0 = torch.randn(n, H, K, V, generator=gen, dtype=torch.float64)
                dfinal = torch.randn(n, H, K, V, generator=gen, dtype=torch.float64)
                for states, method, layout in runs(world):
                    out[(world, decay, name, states, method, layout)] = case(group, world, x, h0, cu, do, dfinal,
                                                                            states, method, layout)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(worker, max(WORLDS))


def _ids(r):
    return "-".join(r)


@pytest.mark.parametrize("docs", ["edges", "span", "random", "whole"])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("run", runs(4), ids=_ids)
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"W{w}")
def test_document_states_sp_match_each_document_alone(results, world, run, decay, docs):
    states, method, layout = run
    use_h0, want_final = STATES[states]
    expected = {"o", "dq", "dk", "dv"} | ({"dg"} if decay in ("g_scalar", "g_per_key") else
                                          {"dg_gamma"} if decay == "g_gamma" else set())
    expected |= ({"final"} if want_final else set()) | ({"dinitial_state"} if use_h0 else set())
    for rank in range(world):
        errs, ok = results[rank][(world, decay, docs) + run]
        assert ok, f"rank {rank}: non-finite results, or a final state that was not asked for"
        assert set(errs) == expected
        bad = {k: v for k, v in errs.items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"


def triton_worker(rank, world):
    """The Triton kernels under the CPU interpreter (float32), two segments per rank, both states."""
    import importlib
    import os
    os.environ["TRITON_INTERPRET"] = "1"   # read when the kernel module is first imported (here)
    importlib.import_module("longscan.kernels.linear_attention.triton")
    from longscan.kernels.linear_attention import LinearKernelOptions
    opts = LinearKernelOptions(chunk=16, chunk_per_key=16, segments=2)
    T, k = 64 * world, 16
    cu = [0, 5, 30, 31, 50, 100, T - 1, T]    # short documents, one over the rank edge in both layouts
    out = {}
    for method, layout, decay, overlap in (("zeco", "zigzag", "g_scalar", False),
                                           ("lasp2", "contiguous", "g_per_key", True)):
        x = make_inputs(decay, 1, T, H, k, k, torch.float64, seed=31)
        x = {n: t for n, t in x.items() if t is not None and n != "initial_state"}
        gen = torch.Generator().manual_seed(8)
        do = torch.randn(1, T, H, k, generator=gen, dtype=torch.float64)
        h0, dfinal = (torch.randn(len(cu) - 1, H, k, k, generator=gen, dtype=torch.float64) for _ in range(2))
        out[(method, layout, decay)] = case(None, world, x, h0, cu, do, dfinal, "both", method, layout,
                                            backend="triton", dtype=torch.float32, overlap=overlap, options=opts)
    return out


def test_document_states_sp_on_triton_kernels():
    pytest.importorskip("triton")
    for rank, res in enumerate(run_distributed(triton_worker, 2)):
        for key, (errs, ok) in res.items():
            assert ok and len(errs) == 7, (rank, key, errs)
            bad = {k: v for k, v in errs.items() if not v <= 1e-4}
            assert not bad, f"rank {rank} {key}: {bad}"


def test_document_states_refused_before_any_collective():
    """An initial state that is not one per document fails on the calling rank, naming it (no group)."""
    x = make_inputs("g_scalar", 1, 16, H, K, V, torch.float64, seed=1)
    with pytest.raises(ValueError, match=r"initial_state with cu_seqlens of 3 documents must be one state per "
                                         r"document \[N, H, K, V\] = \(3, 2, 4, 3\), got \(2, 2, 4, 3\)"):
        linear_attention(x["q"], x["k"], x["v"], x["g"], initial_state=torch.zeros(2, H, K, V, dtype=torch.float64),
                         backend="torch", cu_seqlens=torch.tensor([0, 5, 9, 16]))
