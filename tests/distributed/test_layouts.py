"""shard/unshard/positions: the single source of truth for which tokens a rank holds."""
import pytest
import torch

from harness import run_distributed, world_groups, world_results
from longscan.distributed import positions, segment_ids, shard, unshard

WORLDS = (1, 2, 3)


def layout_cases(world, group):
    x = torch.arange(2 * 4 * world * 3).view(2, 4 * world, 3).float()
    out = {}
    for layout in ("contiguous", "zigzag"):
        local = shard(x, 1, group, layout)
        out[layout] = dict(local=local, back=torch.equal(unshard(local, 1, group, layout), x),
                           pos=positions(local.shape[1], group, layout))
    return out


def layout_worker(rank, world_size):
    """Every W of WORLDS in one spawn of the largest (the smaller ones on sub-groups) -> {W: this rank's}."""
    groups = world_groups(WORLDS, world_size)
    return {world: layout_cases(world, group) for world, group in groups.items() if rank < world}


@pytest.fixture(scope="module")
def all_worlds():
    return run_distributed(layout_worker, max(WORLDS))


@pytest.mark.parametrize("world", WORLDS)
def test_shard_unshard_positions(all_worlds, world):
    results = world_results(all_worlds, world)
    T = 4
    for rank, res in enumerate(results):
        for layout, r in res.items():
            assert r["back"], layout
            # the positions name exactly the tokens the rank holds (x[b, t, 0] = 3·(t + b·T_global))
            assert torch.equal(r["local"][0, :, 0], 3 * r["pos"].float()), (rank, layout)
    # zigzag: rank r holds pieces r and 2W-1-r
    for rank, res in enumerate(results):
        half = T // 2
        want = torch.cat([torch.arange(s * half, (s + 1) * half) for s in segment_ids(rank, world, "zigzag")])
        assert torch.equal(res["zigzag"]["pos"], want)
        assert torch.equal(res["contiguous"]["pos"], torch.arange(rank * T, (rank + 1) * T))


def test_bad_layout_and_lengths():
    with pytest.raises(ValueError, match="layout must be one of"):
        shard(torch.zeros(1, 4), 1, None, "spiral")
    with pytest.raises(ValueError, match="even local length"):
        positions(3, None, "zigzag")
