"""The chain both All-Scans and the delta rule's relay run: blockwise ends against one combine at the ends."""
import torch

from harness import run_distributed
from longscan.distributed import num_segments, segment_ids
from longscan.distributed.chain import blocks, chain_scan

WORLD, X, N_BLOCKS = 3, 7, 3


def chain_worker(rank, world_size):
    """Every layout and direction, both ways of combining the ends -> {case: (carries, last, combine calls)}."""
    out = {}
    for layout in ("contiguous", "zigzag"):
        n = num_segments(world_size, layout)
        gen = torch.Generator().manual_seed(7)
        terms = torch.randn(n, X, 2, generator=gen, dtype=torch.float64)
        scales = 0.5 + torch.rand(n, X, 1, generator=gen, dtype=torch.float64)
        initial = torch.randn(X, 2, generator=gen, dtype=torch.float64)
        mine = segment_ids(rank, world_size, layout)
        for reverse in (False, True):
            for blockwise in (False, True):
                calls = []

                def combine(slot, x0, x1, carry, o):
                    calls.append((x0, x1))
                    torch.addcmul(terms[mine][slot, x0:x1], scales[mine][slot, x0:x1], carry, out=o)
                carries, last = chain_scan(terms[mine].clone(), N_BLOCKS, combine, None, layout, initial, reverse,
                                           blockwise_ends=blockwise)
                out[(layout, reverse, blockwise)] = (carries, last, calls)
    return out


def test_blockwise_ends_combine_block_by_block_with_the_same_result():
    results = run_distributed(chain_worker, WORLD)
    cuts = blocks(X, N_BLOCKS)
    for layout in ("contiguous", "zigzag"):
        for reverse in (False, True):
            for rank, res in enumerate(results):
                whole, by_block = res[(layout, reverse, False)], res[(layout, reverse, True)]
                assert torch.equal(whole[0], by_block[0]), (layout, reverse, rank)
                assert (whole[1] is None) == (by_block[1] is None)
                if whole[1] is not None:
                    assert torch.equal(whole[1], by_block[1])
                assert all(c in cuts for c in by_block[2])            # never a whole range at once
                assert len(by_block[2]) == len(cuts) * len(by_block[0])   # every block of every local segment
            # the chain's last segment is combined whole without blockwise ends (somewhere in the group)
            assert any((0, X) in res[(layout, reverse, False)][2] for res in results)
