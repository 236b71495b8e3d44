"""The delta-rule SP operator on the Triton backend with DeltaTritonOptions(path="wy") (both local stages,
segment transitions and output pass, on the wy kernels), W = 1..4 gloo processes, every method and layout,
the three kinds spread over W (each method and layout meets every kind), float32 under the interpreter,
against the float64 recurrence on the whole sequence: output, final state and every gradient; plus the
options' checks."""
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
CASES = [(m, lay) for m in METHODS for lay in LAYOUTS]
T_LOCAL = 12
DIMS = (1, 1, 16, 8)   # B, H, K, V ([v | 0] is 24 columns: two blocks of the serial kernels' 16, the last part masked)
SHARDED = ("q", "k", "v", "beta", "g")


def kind_of(i: int, world: int) -> str:
    """The kind of case i at world size W: over W = 1, 2, 3 every case meets every kind."""
    return KINDS[(i + world) % len(KINDS)]


def case(rank, world, method, layout, kind, group=None):
    from longscan.kernels.delta_rule.triton import DeltaTritonOptions, wy
    B, H, K, V = DIMS
    T = T_LOCAL * world
    x = make_inputs(kind, B, T, H, K, V, torch.float64, seed=world * 10 + CASES.index((method, layout)))
    gen = torch.Generator().manual_seed(world)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dhts = [torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) for _ in range(world)]
    leaves = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o_ref, s_ref = naive_recurrent_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves["g"],
                                              None, leaves["initial_state"], True)
    names = [n for n, t in leaves.items() if t is not None]
    g_ref = dict(zip(names, torch.autograd.grad((o_ref, s_ref), [leaves[n] for n in names], (do, sum(dhts)))))
    sh = lambda t: shard(t, 1, group, layout)  # noqa: E731
    local = {n: ((sh(t) if n in SHARDED else t).float().clone().requires_grad_() if t is not None else None)
             for n, t in x.items()}
    calls = []   # whether each wy call had q (the output pass) or not (the segment transitions)
    orig = wy.DeltaRuleWY.apply
    wy.DeltaRuleWY.apply = lambda *a: calls.append(a[0] is not None) or orig(*a)
    try:
        o, s = delta_rule_attention(local["q"], local["k"], local["v"], local["beta"], local["g"],
                                    initial_state=local["initial_state"], output_final_state=True, method=method,
                                    group=group, layout=layout, backend="triton", n_blocks=2,
                                    options=DeltaTritonOptions(path="wy", block_v=16))
        grads = torch.autograd.grad((o, s), [local[n] for n in names], (sh(do).float(), dhts[rank].float()))
    finally:
        wy.DeltaRuleWY.apply = orig
    # every local input is float32, so each gradient is float32 too
    return {"calls": calls, "o": rel_err(o.detach(), sh(o_ref.detach())), "final_state": rel_err(s.detach(), s_ref),
            **gradient_errors(names, grads, local, g_ref, sh, group)}


def wy_worker(rank, world_size):
    """Every W of WORLDS in one spawn of the largest (the smaller ones on sub-groups) -> {W: {case: errors}}."""
    # the CPU processes run the kernels in Triton's interpreter (float32), GPU or not; it is read when a kernel
    # is decorated, so it is set before ``case`` first imports the kernels
    os.environ["TRITON_INTERPRET"] = "1"
    groups = world_groups(WORLDS, world_size)
    return {world: {(method, layout): case(rank, world, method, layout, kind_of(i, world), group)
                    for i, (method, layout) in enumerate(CASES)}
            for world, group in groups.items() if rank < world}


WORLDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def all_worlds():
    pytest.importorskip("triton")
    return run_distributed(wy_worker, max(WORLDS))


@pytest.fixture(params=WORLDS, ids=lambda w: f"W{w}")
def wy_results(request, all_worlds):
    world = request.param
    return world, world_results(all_worlds, world)


@pytest.mark.parametrize("method, layout", CASES)
def test_delta_sp_wy_matches_single_device(wy_results, method, layout):
    world, results = wy_results
    kind = kind_of(CASES.index((method, layout)), world)
    expected = {"o", "final_state", "dq", "dk", "dv", "dbeta", "dinitial_state"} | ({"dg"} if kind != "deltanet"
                                                                                    else set())
    for rank, res in enumerate(results):
        errs = dict(res[(method, layout)])
        # one segment transition and one output pass, both on the wy kernels
        assert errs.pop("calls") == [False, True], f"rank {rank}"
        assert set(errs) == expected
        bad = {k: v for k, v in errs.items() if not v <= 1e-4}
        assert not bad, f"rank {rank} ({kind}): {bad}"


def test_delta_sp_options_are_checked():
    pytest.importorskip("triton")
    from longscan.kernels.delta_rule.triton import DeltaTritonOptions
    x = make_inputs("gated", 1, 4, 1, 4, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="options apply to the Triton backend only"):
        delta_rule_attention(**x, backend="torch", options=DeltaTritonOptions(path="wy"))
    with pytest.raises(TypeError, match="options must be a DeltaTritonOptions"):
        delta_rule_attention(**x, backend="triton", options={"path": "wy"})
