"""ZeCO's state relay for the delta rule (transition="relay"), W = 1..4 gloo processes, both layouts, the three
kinds, with and without states, one V block and several, against the float64 recurrence on the whole
sequence: output, final state and the gradients of q, k, v, β, g and initial_state (the replicated one summed
over ranks); the Triton backend under the interpreter in float32 on a few cases; no segment transition is
formed; and the option's checks."""
import os

import pytest
import torch

from delta_cases import KINDS, make_inputs
from harness import gradient_errors, rel_err, run_distributed, world_groups, world_results
from longscan.kernels.delta_rule import naive_recurrent_delta_rule, torch_chunk
from longscan.parallel import delta_rule_attention, shard

pytestmark = pytest.mark.interpreted   # its workers run the Triton kernels in the CPU interpreter

LAYOUTS = ("contiguous", "zigzag")
T_LOCAL = 6
DIMS = (2, 2, 4, 3)   # B, H, K, V: n_blocks=3 puts one V column in each block
RUNS = (("states", 3), ("no_states", 1))   # (with initial and final state?, n_blocks)
SHARDED = ("q", "k", "v", "beta", "g")


def reference(x, do, dht):
    leaves = {n: (t.double().clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o, s = naive_recurrent_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves["g"], None,
                                      leaves["initial_state"], True)
    names = [n for n, t in leaves.items() if t is not None]
    grads = torch.autograd.grad((o, s), [leaves[n] for n in names], (do.double(), dht.double()))
    return o, s, dict(zip(names, grads))


def case(rank, world, layout, kind, dtype, use_state, n_blocks, dims=DIMS, t_local=T_LOCAL, backend="torch",
         options=None, group=None):
    B, H, K, V = dims
    T = t_local * world
    x = make_inputs(kind, B, T, H, K, V, torch.float64, seed=world * 100 + KINDS.index(kind) + 10 * use_state)
    if not use_state:
        x["initial_state"] = None
    gen = torch.Generator().manual_seed(world)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    # a different final-state gradient on every rank: the single-device one is their sum
    dhts = [torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) for _ in range(world)]
    o_ref, s_ref, g_ref = reference(x, do, sum(dhts) if use_state else torch.zeros(B, H, K, V))
    sh = lambda t: shard(t, 1, group, layout)  # noqa: E731
    local = {n: ((sh(t) if n in SHARDED else t).to(dtype).clone().requires_grad_() if t is not None else None)
             for n, t in x.items()}
    o, s = delta_rule_attention(local["q"], local["k"], local["v"], local["beta"], local["g"],
                                initial_state=local["initial_state"], output_final_state=use_state, method="zeco",
                                group=group, layout=layout, backend=backend, n_blocks=n_blocks, options=options,
                                transition="relay")
    names = [n for n, t in local.items() if t is not None]
    outs, gouts = [o], [sh(do).to(dtype)]
    if use_state:
        outs.append(s)
        gouts.append(dhts[rank].to(s.dtype))
    else:
        assert s is None
    grads = torch.autograd.grad(outs, [local[n] for n in names], gouts)
    errs = {"o": rel_err(o, sh(o_ref))}
    if use_state:
        errs["final_state"] = rel_err(s, s_ref)
    return {**errs, **gradient_errors(names, grads, local, g_ref, sh, group)}


def final_state_only(rank, world, group):
    """Only the final state in the loss (the output's gradient never reaches the relay), zigzag, KDA."""
    B, H, K, V = DIMS
    x = make_inputs("kda", B, T_LOCAL * world, H, K, V, torch.float64, seed=5)
    gen = torch.Generator().manual_seed(3)
    dhts = [torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) for _ in range(world)]
    o_ref, s_ref, g_ref = reference(x, torch.zeros(B, T_LOCAL * world, H, V), sum(dhts))
    sh = lambda t: shard(t, 1, group, "zigzag")  # noqa: E731
    local = {n: (sh(t) if n in SHARDED else t).clone().requires_grad_() for n, t in x.items()}
    _, s = delta_rule_attention(**local, output_final_state=True, group=group, layout="zigzag", n_blocks=2,
                                transition="relay")
    names = list(local)
    grads = torch.autograd.grad(s, [local[n] for n in names], dhts[rank])
    return {"final_state": rel_err(s, s_ref), **gradient_errors(names, grads, local, g_ref, sh, group)}


TRITON_WORLD = 2
# (layout, kind, path): the Triton backend's float32 kernels through the backend's public forward, and path="wy"
# through its stages with the k/β/g preparation once a segment
TRITON_CASES = (("zigzag", "kda", "float32"), ("contiguous", "gated", "wy"), ("zigzag", "deltanet", "wy"),
                ("zigzag", "kda", "wy"))
TRITON_DIMS = (1, 1, 16, 20)   # V = 20 in 2 blocks of 10: the serial kernels' 16-column tiles masked
TRITON_T_LOCAL = 20            # a zigzag piece of 10 tokens: a partial chunk


def world_cases(rank, world, group):
    transitions = []   # the relay must form no segment transition
    orig = torch_chunk.segment_transition
    torch_chunk.segment_transition = lambda *a, **kw: transitions.append(1) or orig(*a, **kw)
    try:
        results = {}
        for layout in LAYOUTS:
            for kind in KINDS:
                for run, n_blocks in RUNS:
                    results[(layout, kind, run)] = case(rank, world, layout, kind, torch.float64, run == "states",
                                                        n_blocks, group=group)
        results["float32"] = case(rank, world, "zigzag", "gated", torch.float32, True, 2, group=group)
        results["final_state_only"] = final_state_only(rank, world, group)
    finally:
        torch_chunk.segment_transition = orig
    results["transitions"] = len(transitions)
    if world == 2:   # ranks asking for different transitions: the same error on both, before any chain
        x = make_inputs("gated", 1, 8, 1, 4, 4, torch.float32, seed=0)
        try:
            delta_rule_attention(**x, group=group, transition="relay" if rank else "matrix")
            results["mismatch"] = None
        except ValueError as e:
            results["mismatch"] = f"{type(e).__name__}: {e}"
    if world == TRITON_WORLD:   # the interpreter is slow: a few cases at one world size
        from longscan.kernels.delta_rule.triton import DeltaTritonOptions, wy, wy_relay
        for layout, kind, path in TRITON_CASES:
            # which kernels run: path="wy" prepares each segment once (not once a block) and never runs the
            # whole-sequence wy kernel; the float32 path runs the backend's forward once a block
            calls = {"prepare": 0, "scan": 0}
            prepare, scan = wy_relay.wy_prepare, wy.DeltaRuleWY.apply
            wy_relay.wy_prepare = lambda *a, **kw: calls.update(prepare=calls["prepare"] + 1) or prepare(*a, **kw)
            wy.DeltaRuleWY.apply = lambda *a: calls.update(scan=calls["scan"] + 1) or scan(*a)
            try:
                errs = case(rank, world, layout, kind, torch.float32, True, 2, TRITON_DIMS, TRITON_T_LOCAL, "triton",
                            DeltaTritonOptions(path=path), group)
            finally:
                wy_relay.wy_prepare, wy.DeltaRuleWY.apply = prepare, scan
            results[("triton", layout, kind, path)] = errs, calls
    return results


def relay_worker(rank, world_size):
    """Every W of WORLDS in one spawn of the largest (the smaller ones on sub-groups) -> {W: {case: errors}}."""
    os.environ["TRITON_INTERPRET"] = "1"   # read when triton is first imported
    groups = world_groups(WORLDS, world_size)
    return {world: world_cases(rank, world, group) for world, group in groups.items() if rank < world}


WORLDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def all_worlds():
    return run_distributed(relay_worker, max(WORLDS))


@pytest.fixture(params=WORLDS, ids=lambda w: f"W{w}")
def relay_results(request, all_worlds):
    return world_results(all_worlds, request.param)


def expected_keys(kind, states):
    keys = {"o", "dq", "dk", "dv", "dbeta"} | ({"final_state", "dinitial_state"} if states else set())
    return keys | ({"dg"} if kind != "deltanet" else set())


@pytest.mark.parametrize("run", [r for r, _ in RUNS])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_relay_matches_single_device(relay_results, layout, kind, run):
    for rank, res in enumerate(relay_results):
        errs = res[(layout, kind, run)]
        assert set(errs) == expected_keys(kind, run == "states")
        bad = {k: v for k, v in errs.items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"


def test_relay_float32_and_final_state_only(relay_results):
    for rank, res in enumerate(relay_results):
        assert set(res["float32"]) == expected_keys("gated", True)
        assert max(res["float32"].values()) <= 1e-4, f"rank {rank}: {res['float32']}"
        assert set(res["final_state_only"]) == {"final_state"} | expected_keys("kda", True) - {"o"}
        assert max(res["final_state_only"].values()) <= 1e-10, f"rank {rank}: {res['final_state_only']}"


def test_relay_forms_no_segment_transition(relay_results):
    assert all(res["transitions"] == 0 for res in relay_results)


@pytest.mark.parametrize("layout, kind, path", TRITON_CASES)
def test_relay_on_the_triton_backend(relay_results, layout, kind, path):
    pytest.importorskip("triton")
    if len(relay_results) != TRITON_WORLD:
        pytest.skip(f"run with W = {TRITON_WORLD} only")
    n_local = 2 if layout == "zigzag" else 1
    for rank, res in enumerate(relay_results):
        errs, calls = res[("triton", layout, kind, path)]
        assert set(errs) == expected_keys(kind, True)
        assert max(errs.values()) <= 1e-4, f"rank {rank}: {errs}"
        assert calls == ({"prepare": n_local, "scan": 0} if path == "wy" else {"prepare": 0, "scan": 0}), calls


def test_differing_transitions_raise_the_same_error_on_every_rank(relay_results):
    if len(relay_results) != 2:
        pytest.skip("run with W = 2 only")
    messages = [res["mismatch"] for res in relay_results]
    assert messages[0] is not None and messages[0] == messages[1], messages
    assert messages[0].startswith("CrossRankMismatch: ")
    assert "transition must be equal on every rank of the SP group: 'matrix' on rank 0; 'relay' on rank 1" in \
        messages[0], messages[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(transition="scan"), r"transition must be one of \('matrix', 'relay'\), got 'scan'"),
    (dict(method="lasp2", transition="relay"), "transition='relay' is an option of method='zeco'"),
    (dict(method="lasp1", transition="relay"), "transition='relay' is an option of method='zeco'"),
])
def test_bad_transition_is_named(kwargs, message):
    x = make_inputs("gated", 1, 4, 1, 4, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match=message):
        delta_rule_attention(**x, **kwargs)
