"""Linear SP on the torch backend with log decays of -inf (full resets) inside a rank's piece, W = 2, both
layouts: output, final state and every gradient against the single-device float64 recurrence."""
import pytest
import torch
import torch.distributed as dist

from harness import rel_err, run_distributed
from linear_cases import make_inputs
from longscan.kernels.linear_attention import naive_recurrent_linear_attention
from longscan.parallel import linear_attention, shard

METHODS = ("zeco", "lasp2", "lasp1")
LAYOUTS = ("contiguous", "zigzag")
DECAYS = ("g_scalar", "g_per_key")
B, H, K, V, T_LOCAL, WORLD = 2, 2, 4, 3, 8, 2
# token 5: inside rank 0's piece (contiguous) or rank 1's (zigzag, 4-token segments); token 12: in one
# (batch, head), and for per-key gates in some keys only
RESETS = (5, 12)


def inputs(decay, use_state):
    x = make_inputs(decay, B, T_LOCAL * WORLD, H, K, V, torch.float64, seed=11)
    x["g"][:, RESETS[0]] = float("-inf")
    x["g"][1, RESETS[1], 0] = float("-inf")
    if decay == "g_per_key":
        x["g"][1, RESETS[1], 0, 2:] = -0.3
    if not use_state:
        x["initial_state"] = None
    return x


def case(rank, method, layout, decay, use_state):
    x = inputs(decay, use_state)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(B, T_LOCAL * WORLD, H, V, generator=gen, dtype=torch.float64)
    dhts = [torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) for _ in range(WORLD)]
    ref = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    o_ref, s_ref = naive_recurrent_linear_attention(ref["q"], ref["k"], ref["v"], ref["g"], None, None,
                                                    ref.get("initial_state"), True)
    names = list(ref)
    dht = sum(dhts) if use_state else torch.zeros_like(s_ref)
    g_ref = dict(zip(names, torch.autograd.grad((o_ref, s_ref), [ref[n] for n in names], (do, dht))))

    def sh(t):
        return shard(t, 1, None, layout)

    local = {n: (t if n == "initial_state" else sh(t)).clone().requires_grad_() for n, t in x.items()
             if t is not None}
    o, s = linear_attention(local["q"], local["k"], local["v"], local["g"], None,
                            initial_state=local.get("initial_state"), output_final_state=use_state,
                            method=method, layout=layout, n_blocks=2, backend="torch")
    outs, grads_out = ([o, s], [sh(do), dhts[rank]]) if use_state else ([o], [sh(do)])
    grads = torch.autograd.grad(outs, [local[n] for n in names], grads_out)
    errs = {"o": rel_err(o, sh(o_ref))}
    finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(d).all()) for d in grads)
    if use_state:
        errs["final_state"] = rel_err(s, s_ref)
        finite &= bool(torch.isfinite(s).all())
    for n, got in zip(names, grads):
        if n == "initial_state":    # replicated: the gradient summed over ranks
            got = got.clone()
            dist.all_reduce(got)
            errs["d" + n] = rel_err(got, g_ref[n])
        else:
            errs["d" + n] = rel_err(got, sh(g_ref[n]))
    return errs, finite


def worker(rank, world):
    return {(m, lay, d, st): case(rank, m, lay, d, st)
            for m in METHODS for lay in LAYOUTS for d in DECAYS for st in (True, False)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(worker, WORLD)


@pytest.mark.parametrize("use_state", [True, False], ids=["state", "no_state"])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_full_reset_sp_matches_single_device(results, method, layout, decay, use_state):
    expected = {"o", "dq", "dk", "dv", "dg"} | ({"final_state", "dinitial_state"} if use_state else set())
    for rank, res in enumerate(results):
        errs, finite = res[(method, layout, decay, use_state)]
        assert finite, f"rank {rank}: non-finite results"
        assert set(errs) == expected
        bad = {k: v for k, v in errs.items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"
