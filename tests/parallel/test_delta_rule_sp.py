"""The delta-rule SP methods × kinds × layouts, W = 1..4, against the float64 recurrence on the whole
sequence: output, final state and the gradients of q, k, v, β, g and initial_state (the replicated one
summed over ranks); plus float32 without states and the input checks."""
import os

import pytest
import torch

from delta_cases import KINDS, make_inputs
from harness import gradient_errors, rel_err, run_distributed, world_groups, world_results
from longscan.kernels.delta_rule import naive_recurrent_delta_rule
from longscan.parallel import delta_rule_attention, shard

pytestmark = pytest.mark.interpreted   # its workers run the Triton kernels in the CPU interpreter

METHODS = ("zeco", "lasp2", "lasp1")
LAYOUTS = ("contiguous", "zigzag")
T_LOCAL = 6
DIMS = (2, 2, 4, 3)   # B, H, K, V
SHARDED = ("q", "k", "v", "beta", "g")


def reference(x, do, dht):
    leaves = {n: (t.double().clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o, s = naive_recurrent_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves["g"], None,
                                      leaves["initial_state"], True)
    names = [n for n, t in leaves.items() if t is not None]
    grads = torch.autograd.grad((o, s), [leaves[n] for n in names], (do.double(), dht.double()))
    return o, s, dict(zip(names, grads))


def case(rank, world, method, layout, kind, dtype, use_state, chunk_backend="torch", group=None):
    B, H, K, V = DIMS
    T = T_LOCAL * world
    x = make_inputs(kind, B, T, H, K, V, dtype, seed=world * 100 + KINDS.index(kind))
    if not use_state:
        x["initial_state"] = None
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(dtype)
    # a different final-state gradient on every rank: the single-device one is their sum
    dhts = [torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(dtype) for _ in range(world)]
    o_ref, s_ref, g_ref = reference(x, do, sum(dhts) if use_state else torch.zeros(B, H, K, V))
    sh = lambda t: shard(t, 1, group, layout)  # noqa: E731
    local = {n: ((sh(t) if n in SHARDED else t).clone().requires_grad_() if t is not None else None)
             for n, t in x.items()}
    o, s = delta_rule_attention(local["q"], local["k"], local["v"], local["beta"], local["g"],
                                initial_state=local["initial_state"], output_final_state=use_state,
                                method=method, group=group, layout=layout, backend=chunk_backend, n_blocks=2)
    names = [n for n, t in local.items() if t is not None]
    outs, gouts = [o], [sh(do)]
    if use_state:
        outs.append(s)
        gouts.append(dhts[rank])
    else:
        assert s is None
    grads = torch.autograd.grad(outs, [local[n] for n in names], gouts)
    errs = {"o": rel_err(o, sh(o_ref))}
    if use_state:
        errs["final_state"] = rel_err(s, s_ref)
    return {**errs, **gradient_errors(names, grads, local, g_ref, sh, group)}


def sp_worker(rank, world_size):
    """Every W of WORLDS in one spawn of the largest (the smaller ones on sub-groups) -> {W: {case: errors}}."""
    # the Triton backend runs under the CPU interpreter (float32); triton reads this when first imported,
    # which the torch backend's activation checkpointing does, so it is set before any case
    os.environ["TRITON_INTERPRET"] = "1"
    groups = world_groups(WORLDS, world_size)
    return {world: world_cases(rank, world, group) for world, group in groups.items() if rank < world}


def world_cases(rank, world, group):
    results = {}
    for method in METHODS:
        for layout in LAYOUTS:
            for kind in KINDS:
                results[(method, layout, kind, "float64")] = case(rank, world, method, layout, kind,
                                                                  torch.float64, True, group=group)
                if method == "zeco":   # float32 without states: one method (the dtype path is shared)
                    results[(method, layout, kind, "float32")] = case(rank, world, method, layout, kind,
                                                                      torch.float32, False, group=group)
    # the recurrence as the local backend (no chunking at all) through the same SP stages
    results[("zeco", "zigzag", "kda", "naive")] = case(rank, world, "zeco", "zigzag", "kda", torch.float64, True,
                                                       "naive", group)
    for method, layout, kind in (TRITON_CASES if world == TRITON_WORLD else ()):   # the interpreter is slow
        results[(method, layout, kind, "triton")] = case(rank, world, method, layout, kind, torch.float32, True,
                                                         "triton", group)
    return results


TRITON_CASES = (("zeco", "zigzag", "kda"), ("lasp2", "contiguous", "gated"), ("lasp1", "zigzag", "deltanet"))
TRITON_WORLD = 2


WORLDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def all_worlds():
    return run_distributed(sp_worker, max(WORLDS))


@pytest.fixture(params=WORLDS, ids=lambda w: f"W{w}")
def sp_results(request, all_worlds):
    return world_results(all_worlds, request.param)


@pytest.mark.parametrize("method, run", [(m, "float64") for m in METHODS] + [("zeco", "float32")])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_delta_rule_sp_matches_single_device(sp_results, method, layout, kind, run):
    tol = 1e-5 if run == "float64" else 1e-4
    expected = {"o", "dq", "dk", "dv", "dbeta"} | ({"final_state", "dinitial_state"} if run == "float64" else set())
    expected |= {"dg"} if kind != "deltanet" else set()
    for rank, res in enumerate(sp_results):
        errs = res[(method, layout, kind, run)]
        assert set(errs) == expected
        bad = {k: v for k, v in errs.items() if not v <= tol}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("method, layout, kind", TRITON_CASES)
def test_delta_rule_sp_on_the_triton_backend(sp_results, method, layout, kind):
    pytest.importorskip("triton")
    if len(sp_results) != TRITON_WORLD:
        pytest.skip(f"run with W = {TRITON_WORLD} only")
    for rank, res in enumerate(sp_results):
        errs = res[(method, layout, kind, "triton")]
        assert len(errs) == 7 + (kind != "deltanet") and max(errs.values()) <= 1e-4, f"rank {rank}: {errs}"


def test_delta_rule_sp_on_the_naive_backend(sp_results):
    for rank, res in enumerate(sp_results):
        errs = res[("zeco", "zigzag", "kda", "naive")]
        assert len(errs) == 8 and max(errs.values()) <= 1e-5, f"rank {rank}: {errs}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="ring"), "method must be one of"),
    (dict(layout="striped"), "layout must be one of"),
    (dict(n_blocks=0), "n_blocks must be a positive int"),
    (dict(backend="fla"), "backend must be one of"),
])
def test_bad_arguments_are_named(kwargs, message):
    x = make_inputs("gated", 1, 4, 1, 4, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match=message):
        delta_rule_attention(**x, **kwargs)
    with pytest.raises(ValueError, match="needs an even local length"):
        delta_rule_attention(**make_inputs("gated", 1, 5, 1, 4, 4, torch.float32, seed=0), layout="zigzag")


@pytest.mark.parametrize("method", METHODS)
def test_one_device_final_state_without_initial_state(method):
    """No group, no initial_state, the final state asked for: forward and backward against the recurrence."""
    x = make_inputs("kda", 1, 8, 2, 4, 3, torch.float64, seed=3)
    x["initial_state"] = None
    ref = reference(x, torch.ones(1, 8, 2, 3, dtype=torch.float64), torch.ones(1, 2, 4, 3, dtype=torch.float64))
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    o, s = delta_rule_attention(**leaves, output_final_state=True, method=method, layout="zigzag")
    (o.sum() + s.sum()).backward()
    assert rel_err(o, ref[0]) < 1e-12 and rel_err(s, ref[1]) < 1e-12
    assert all(rel_err(leaves[n].grad, ref[2][n]) < 1e-10 for n in leaves)
