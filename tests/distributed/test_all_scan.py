"""The All-Scan against the serial scan on one process: W up to 8, n_blocks 1..4, both layouts and directions."""
import pytest
import torch

from harness import rel_err, run_distributed, world_results
from longscan.distributed import all_scan, num_segments, segment_ids, serial_scan

N_BLOCKS = (1, 2, 3, 4)
LAYOUTS = ("contiguous", "zigzag")
WORLDS = (1, 2, 3, 5, 8)


def global_inputs(world, layout):
    gen = torch.Generator().manual_seed(100 + world)
    n = num_segments(world, layout)
    states = torch.randn(n, 2, 3, 4, 5, generator=gen, dtype=torch.float64)
    log_decays = -0.05 - torch.rand(n, 2, 3, 4, generator=gen, dtype=torch.float64)
    initial = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    return states, log_decays, initial


def scan_cases(rank, world, group):
    """Every case on this rank of a group of ``world`` -> {case: (relative error of the carries, error of `last`
    or None)}."""
    out = {}
    for layout in LAYOUTS:
        states, log_decays, initial = global_inputs(world, layout)
        mine = segment_ids(rank, world, layout)
        for reverse in (False, True):
            for with_initial in (False, True):
                init = initial if with_initial else None
                ref, ref_last = serial_scan(states, log_decays, init, reverse)
                for n_blocks in N_BLOCKS:
                    carries, last = all_scan(states[mine], log_decays[mine], group, layout, n_blocks, init, reverse)
                    out[(layout, reverse, with_initial, n_blocks)] = (
                        rel_err(carries, ref[mine]), None if last is None else rel_err(last, ref_last))
    return out


def scan_worker(rank, world_size):
    """One spawn of the largest world: each smaller W on the sub-group of ranks 0..W-1, the largest on the
    default group (group=None) -> {W: this rank's cases}."""
    import torch.distributed as dist
    groups = {w: dist.new_group(list(range(w))) for w in WORLDS if w < world_size}  # every rank creates each
    out = {}
    for w in WORLDS:
        if rank < w:
            out[w] = scan_cases(rank, w, groups.get(w))
    return out


@pytest.fixture(scope="module")
def all_worlds():
    return run_distributed(scan_worker, max(WORLDS))


@pytest.fixture(params=WORLDS, ids=lambda w: f"W{w}")
def scan_results(request, all_worlds):
    world = request.param
    return world, world_results(all_worlds, world)


def test_all_scan_equals_serial_scan(scan_results):
    world, results = scan_results
    for layout in LAYOUTS:
        # exactly one rank ends each scan: the owner of the last segment in scan order
        for key in [k for k in results[0] if k[0] == layout]:
            lasts = [r[key][1] for r in results if r[key][1] is not None]
            assert len(lasts) == 1, key
            assert lasts[0] <= 1e-12, key
            for rank, res in enumerate(results):
                assert res[key][0] <= 1e-12, (rank, key)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_initial", [False, True])
def test_serial_scan_closed_form(n, reverse, with_initial):
    """serial_scan (the reference above, and the whole All-Scan of one rank) against the unrolled sum: the
    carry entering position p of the scan order is Σ_{i<p} exp(a_{i+1} + … + a_{p-1}) ⊙ S_i, plus the
    initial state decayed by every segment before p."""
    states, log_decays, initial = global_inputs(n, "contiguous")
    init = initial if with_initial else None
    carries, last = serial_scan(states, log_decays, init, reverse)
    order = list(range(n))[::-1] if reverse else list(range(n))
    for p in range(n + 1):
        want = torch.zeros_like(states[0]) if init is None else init * log_decays[order[:p]].sum(0).exp().unsqueeze(-1)
        for i in range(p):
            want = want + log_decays[order[i + 1:p]].sum(0).exp().unsqueeze(-1) * states[order[i]]
        got = carries[order[p]] if p < n else last
        assert rel_err(got, want) <= 1e-12, (p, got.abs().max())
    # the final carry is a tensor of its own, never a view of the caller's states
    assert last.data_ptr() not in {s.data_ptr() for s in states}


def test_all_scan_rejects_bad_shapes():
    states = torch.zeros(1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="log_decays must be"):
        all_scan(states, torch.zeros(1, 2, 3, 5))
    with pytest.raises(ValueError, match="states must be"):
        all_scan(states, torch.zeros(1, 2, 3, 4), layout="zigzag")
    with pytest.raises(ValueError, match="n_blocks must be"):
        all_scan(states, torch.zeros(1, 2, 3, 4), n_blocks=5)
