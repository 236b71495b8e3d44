"""Every linear SP method × decay kind × layout × dtype, W = 1..4, against the float64 recurrent reference
on the whole sequence: output, final state and the gradients of q, k, v, g / g_gamma and initial_state."""
import pytest
import torch

from harness import gradient_errors, rel_err, run_distributed, world_groups, world_results
from linear_cases import DECAYS, make_inputs
from longscan.kernels.linear_attention import naive_recurrent_linear_attention
from longscan.parallel import linear_attention, shard

pytestmark = pytest.mark.interpreted   # its workers run the Triton kernels in the CPU interpreter

METHODS = ("zeco", "lasp2", "lasp1")
LAYOUTS = ("contiguous", "zigzag")
DTYPES = {"float64": (torch.float64, 1e-5), "float32": (torch.float32, 1e-4)}
# the float64 cases run once more with overlap=False (the output pass waits for the collective)
RUNS = {"float64": True, "float32": True, "float64-serial": False}
T_LOCAL = 8


def reference(x, dos, dhts):
    """Single-device float64 result and gradients; the final-state gradient is the sum of every rank's
    (no final-state gradient when ``dhts`` is empty)."""
    leaves = {n: (t.double().clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o, s = naive_recurrent_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["g_gamma"],
                                            None, leaves["initial_state"], True)
    names = [n for n, t in leaves.items() if t is not None]
    dht = sum(dhts).double() if dhts else torch.zeros_like(s)
    grads = torch.autograd.grad((o, s), [leaves[n] for n in names], (dos.double(), dht))
    return o, s, dict(zip(names, grads))


def case(rank, world, method, layout, decay, dtype, use_state, backend="auto", dims=(2, 2, 4, 3), t_local=T_LOCAL,
         learn_g_gamma=True, overlap=True, edit=None, options=None, group=None):
    """Relative errors of this rank's results for one case (dims: B, H, K, V; edit changes the inputs first)."""
    B, H, K, V = dims
    x = make_inputs(decay, B, t_local * world, H, K, V, dtype, seed=world * 1000 + DECAYS.index(decay))
    if edit is not None:
        edit(x)
    if not use_state:
        x["initial_state"] = None
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(B, t_local * world, H, V, generator=gen, dtype=torch.float64).to(dtype)
    # a different final-state gradient on every rank: the single-device one is their sum
    dhts = [torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(dtype) for _ in range(world)]
    o_ref, s_ref, g_ref = reference(x, do, dhts if use_state else [])

    def sh(t):
        return shard(t, 1, group, layout)

    local = {n: (t if n in ("g_gamma", "initial_state") else sh(t)) if t is not None else None for n, t in x.items()}
    local = {n: (t.clone().requires_grad_(n != "g_gamma" or learn_g_gamma) if t is not None else None)
             for n, t in local.items()}
    o, s = linear_attention(local["q"], local["k"], local["v"], local["g"], local["g_gamma"],
                            initial_state=local["initial_state"], output_final_state=use_state,
                            method=method, group=group, layout=layout, n_blocks=3, backend=backend, overlap=overlap,
                            options=options)
    names = [n for n, t in local.items() if t is not None and t.requires_grad]
    outs, grads_out = [o], [sh(do)]
    if use_state:
        outs.append(s)
        grads_out.append(dhts[rank])
    else:
        assert s is None
    given = [t.clone() for t in grads_out]
    grads = torch.autograd.grad(outs, [local[n] for n in names], grads_out)
    # the caller's output gradients are left as they were (the final-state one is summed over ranks in a copy)
    assert all(torch.equal(a, b) for a, b in zip(grads_out, given))
    errs = {"o": rel_err(o, sh(o_ref))}
    if use_state:
        errs["final_state"] = rel_err(s, s_ref)
    return {**errs, **gradient_errors(names, grads, local, g_ref, sh, group)}


def sp_worker(rank, world_size):
    """Every W of WORLDS in one spawn of the largest (the smaller ones on sub-groups) -> {W: {case: errors}}."""
    groups = world_groups(WORLDS, world_size)
    return {world: world_cases(rank, world, group) for world, group in groups.items() if rank < world}


def world_cases(rank, world, group):
    results = {}
    for method in METHODS:
        for layout in LAYOUTS:
            for decay in DECAYS:
                for run, overlap in RUNS.items():
                    dname = run.split("-")[0]
                    # float64 cases carry an initial and final state, float32 ones do not
                    results[(method, layout, decay, run)] = case(rank, world, method, layout, decay,
                                                                 DTYPES[dname][0], use_state=dname == "float64",
                                                                 overlap=overlap, group=group)
    return results


WORLDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def all_worlds():
    return run_distributed(sp_worker, max(WORLDS))


@pytest.fixture(params=WORLDS, ids=lambda w: f"W{w}")
def sp_results(request, all_worlds):
    return world_results(all_worlds, request.param)


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_linear_sp_matches_single_device(sp_results, method, layout, decay, run):
    dname = run.split("-")[0]
    tol = DTYPES[dname][1]
    expected = {"o", "dq", "dk", "dv"} | ({"final_state", "dinitial_state"} if dname == "float64" else set())
    expected |= {"dg"} if decay in ("g_scalar", "g_per_key") else {"dg_gamma"} if decay == "g_gamma" else set()
    for rank, res in enumerate(sp_results):
        errs = res[(method, layout, decay, run)]
        assert set(errs) == expected
        bad = {k: v for k, v in errs.items() if not v <= tol}
        assert not bad, f"rank {rank}: {bad}"


def triton_sp_worker(rank, world):
    """The Triton backend under the CPU interpreter, with sequences long enough for several segments per
    rank, so the SP passes hand each other their segment states as they do on a GPU."""
    import importlib
    import os
    os.environ["TRITON_INTERPRET"] = "1"   # read when the kernel module is first imported (here)
    importlib.import_module("longscan.kernels.linear_attention.triton")
    from longscan.kernels.linear_attention import LinearKernelOptions
    opts = LinearKernelOptions(chunk=16, chunk_per_key=16, segments=2)
    results = {}
    for method in METHODS:
        for i, layout in enumerate(LAYOUTS):
            for j, decay in enumerate(DECAYS):
                # each schedule on half the decays of a layout, the other half on the other layout: every
                # (method, layout, schedule) and (method, decay, schedule) runs, at half the interpreted cases
                overlap = (i + j) % 2 == 0
                results[(method, layout, decay, overlap)] = case(
                    rank, world, method, layout, decay, torch.float32, True, backend="triton",
                    dims=(1, 2, 16, 16), t_local=64, learn_g_gamma=True,
                    overlap=overlap, options=opts)
    for overlap in (True, False):   # per-key gates that fall steeply inside chunks on both ranks (the levels)
        results[("zeco", "zigzag", "steep", overlap)] = case(
            rank, world, "zeco", "zigzag", "g_per_key", torch.float32, True, backend="triton", dims=(1, 2, 16, 16),
            t_local=64, overlap=overlap, edit=steep_gates, options=opts)
    return results, pre_passes(rank, world, opts), checkpointed(rank, world, opts)


def pre_passes(rank, world, opts):
    """Per-key gates: the pre-passes of one SP step, as (reads q, reads k, takes an earlier kd, writes the
    backward's factors), and its state passes (from the segment start: over (q, do)), for each overlap
    setting (the kernels' trace events)."""
    from longscan.kernels import trace
    seen = {}
    for overlap in (True, False):
        with trace.record() as events:
            case(rank, world, "lasp2", "contiguous", "g_per_key", torch.float32, True, backend="triton",
                 dims=(1, 2, 16, 16), t_local=64, overlap=overlap, options=opts)
        calls = [(e.info["q"], e.info["k"], e.info["kd"], e.info["factors"]) for e in events
                 if e.name == "gate_operands"]
        states = ["q, do" if e.info["from_start"] else "k, v" for e in events if e.name == "states"]
        seen[overlap] = calls, states
    return seen


def checkpointed(rank, world, opts):
    """Per-key gates through torch.utils.checkpoint: -> (whether the gate operands the first forward kept were
    freed after it, without and with checkpointing; the gradients' largest relative difference between the two).
    The operands go through autograd's saved tensors, which checkpointing drops and recomputes."""
    import gc
    import weakref
    x = make_inputs("g_per_key", 1, 64 * world, 2, 16, 16, torch.float32, seed=23)
    from longscan.kernels.linear_attention.triton import TritonBackend
    refs = []
    forward = TritonBackend.forward

    def watched(self, *args, **kwargs):   # the backend's public forward, watched for what it keeps
        out = forward(self, *args, **kwargs)
        if kwargs.get("keep") and not refs:   # the first forward, not the recomputed one
            refs.append(weakref.ref(out[2].operands.qd))
        return out
    TritonBackend.forward = watched
    local = {n: shard(x[n], 1, None, "zigzag") for n in ("q", "k", "v", "g")}

    def loss(t):
        o, _ = linear_attention(t["q"], t["k"], t["v"], t["g"], method="zeco", layout="zigzag", backend="triton",
                                options=opts)
        return o.square().sum()
    grads, freed = [], []
    try:
        for ckpt in (False, True):
            refs.clear()
            leaves = {n: t.clone().requires_grad_() for n, t in local.items()}
            out = torch.utils.checkpoint.checkpoint(loss, leaves, use_reentrant=False) if ckpt else loss(leaves)
            gc.collect()
            freed.append(refs[0]() is None)
            out.backward()
            grads.append([leaves[n].grad for n in local])
    finally:
        TritonBackend.forward = forward
    return freed, max(rel_err(a, b) for a, b in zip(*grads))


def steep_gates(x):
    """Log gates of -7 and -100 a token on two keys and a -300 step on a third (every rank's part of the
    sequence under zigzag has some): chunk sums far below float32's exp range."""
    g = x["g"]
    g[..., 0], g[..., 1] = -7.0, -100.0
    g[:, 5::40, :, 2] = -300.0


def test_linear_sp_on_triton_kernels_with_segments():
    for rank, (res, passes, ckpt) in enumerate(run_distributed(triton_sp_worker, 2)):
        assert len(res) == len(METHODS) * len(LAYOUTS) * len(DECAYS) + 2
        assert {key[-1] for key in res} == {True, False}
        for key, errs in res.items():
            assert len(errs) >= 6, key
            bad = {k: v for k, v in errs.items() if not v <= 1e-4}
            assert not bad, f"rank {rank} {key}: {bad}"
        # Per-key gates: the state pass writes every operand with the backward's factors, and neither the
        # output pass nor the backward (prefix_grad and the kernels) runs one (each had one before). The
        # output pass from P hands the backward its segment prefixes: no (k, v) state pass in the backward.
        assert passes[False] == ([(True, True, False, True)], ["k, v", "q, do"]), passes
        # overlap off CUDA: one pass gives output and state from zero (no state pass before it), so the
        # backward computes the prefixes from P again
        assert passes[True] == ([(True, True, False, True)], ["k, v", "q, do", "k, v"]), passes
        freed, err = ckpt
        assert freed == [False, True] and err <= 1e-6, ckpt


def bad_input_worker(rank, world):
    """Errors raised on every rank (so none hangs in a collective) -> {case: message}."""
    x = make_inputs("g_scalar", 1, 8, 2, 4, 4, torch.float32, seed=0)
    q, k, v = x["q"], x["k"], x["v"]
    T = 8 if rank == 0 else 6
    cases = {
        "lengths differ": lambda: linear_attention(q[:, :T], k[:, :T], v[:, :T]),
        "zigzag odd": lambda: linear_attention(q[:, :7], k[:, :7], v[:, :7], layout="zigzag"),
        "method": lambda: linear_attention(q, k, v, method="lasp3"),
        "layout": lambda: linear_attention(q, k, v, layout="striped"),
        "n_blocks": lambda: linear_attention(q, k, v, n_blocks=0),
        "both gates": lambda: linear_attention(q, k, v, g=x["g"], g_gamma=torch.zeros(2)),
        "overlap": lambda: linear_attention(q, k, v, overlap="yes"),
        "options": lambda: linear_attention(q, k, v, options={"chunk": 16}),
    }
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except (ValueError, TypeError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def test_bad_inputs_raise_on_every_rank():
    expected = {"lengths differ": "local length.*equal on every rank", "zigzag odd": "needs an even local length",
                "method": "method must be one of", "layout": "layout must be one of",
                "n_blocks": "n_blocks must be", "both gates": "at most one of g and g_gamma",
                "overlap": "overlap must be True or False",
                "options": "options must be a LinearKernelOptions"}
    import re
    for rank, res in enumerate(run_distributed(bad_input_worker, 2)):
        for name, pattern in expected.items():
            assert res[name] is not None and re.search(pattern, res[name]), (rank, name, res[name])


def mixed_precision_worker(rank, world):
    """bf16 q, k, v with float32 gates and states, as a bf16 model calls it."""
    x = make_inputs("g_per_key", 2, 16 * world, 2, 8, 8, torch.float64, seed=3)
    o_ref, s_ref = naive_recurrent_linear_attention(x["q"], x["k"], x["v"], x["g"], None, None,
                                                    x["initial_state"], True)

    def sh(t):
        return shard(t, 1, None, "zigzag")

    q, k, v = (sh(x[n]).bfloat16().requires_grad_() for n in "qkv")
    g = sh(x["g"]).float().requires_grad_()
    o, s = linear_attention(q, k, v, g, initial_state=x["initial_state"].float(), output_final_state=True,
                            layout="zigzag")
    (o.float().sum() + s.sum()).backward()
    return dict(dtypes=(o.dtype, s.dtype, q.grad.dtype, g.grad.dtype), o=rel_err(o, sh(o_ref)),
                s=rel_err(s, s_ref))


def test_bf16_inputs_with_float32_gates_and_states():
    for res in run_distributed(mixed_precision_worker, 2):
        assert res["dtypes"] == (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32)
        assert res["o"] <= 1e-2 and res["s"] <= 1e-2
