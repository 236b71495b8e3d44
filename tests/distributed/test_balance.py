"""The document order of balance.py against brute force: the closed-form pair counts and swaps against
documents.causal_pairs_per_rank, the order against every order of a few documents, never worse than the
given order, and the token map of a reordered sequence (no processes needed)."""
import itertools

import pytest
import torch

from longscan.distributed.balance import (BalanceSearch, balanced_order, rank_pairs, reorder_documents,
                                          swap_pairs)
from longscan.distributed.documents import causal_pairs_per_rank
from longscan.distributed.layouts import num_segments

CASES = [(w, layout, seed) for w in (1, 2, 3, 4, 8) for layout in ("contiguous", "zigzag") for seed in (0, 1, 2)]


def random_lengths(gen, n, world, layout, max_len=40):
    """n document lengths in [1, max_len] whose total splits into the layout's pieces."""
    lengths = torch.randint(1, max_len + 1, (n,), generator=gen)
    lengths[-1] += (-int(lengths.sum())) % num_segments(world, layout)
    return lengths


def pairs(lengths, world, layout):
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return causal_pairs_per_rank(cu, int(cu[-1]), world, layout)


@pytest.mark.parametrize("world,layout,seed", CASES)
def test_pair_counts_and_swaps_match_causal_pairs_per_rank(world, layout, seed):
    gen = torch.Generator().manual_seed(seed + 10 * world)
    for n in (1, 2, 5, 11):
        lengths = random_lengths(gen, n, world, layout)
        assert rank_pairs(lengths, world, layout)[0].tolist() == pairs(lengths, world, layout)
        i, j = (x.reshape(-1) for x in torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"))
        swapped = swap_pairs(lengths, i, j, world, layout)
        for c in range(i.numel()):
            order = torch.arange(n)
            order[i[c]], order[j[c]] = j[c].clone(), i[c].clone()
            assert swapped[c].tolist() == pairs(lengths[order], world, layout), (int(i[c]), int(j[c]))


@pytest.mark.parametrize("world,layout,seed", CASES)
def test_order_is_a_permutation_never_worse_and_optimal_for_few_documents(world, layout, seed):
    gen = torch.Generator().manual_seed(seed + 100 * world)
    for n in (1, 3, 6, 9, 20):
        lengths = random_lengths(gen, n, world, layout)
        order = balanced_order(lengths, world, layout)
        assert order.dtype == torch.int64 and sorted(order.tolist()) == list(range(n))
        given = max(pairs(lengths, world, layout))
        got = max(pairs(lengths[order], world, layout))
        assert got <= given
        if got == given:
            assert order.tolist() == list(range(n))              # no gain: the given order is kept
        if n <= BalanceSearch().every_order_up_to:
            best = min(max(pairs(lengths[list(p)], world, layout)) for p in itertools.permutations(range(n)))
            assert got == best


def test_unbalanced_sequence_is_balanced():
    """Eight one-token documents, then one of 8 tokens, over 2 contiguous ranks: rank 1 holds the whole long
    document (1 + ... + 8 = 36 pairs against 8). The best order puts 2 short ones first and 6 after it."""
    lengths = torch.tensor([1] * 8 + [8])
    assert pairs(lengths, 2, "contiguous") == [8, 36]
    order = balanced_order(lengths, 2, "contiguous")
    assert pairs(lengths[order], 2, "contiguous") == [2 + 1 + 2 + 3 + 4 + 5 + 6, 7 + 8 + 6]
    # zigzag, 4 ranks, long documents first: far above the mean before, close to it after (local search: N > 7)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.cat([torch.randint(100, 300, (4,), generator=gen), torch.randint(1, 40, (60,), generator=gen)])
    lengths[-1] += (-int(lengths.sum())) % 8
    before = torch.tensor(pairs(lengths, 4, "zigzag"), dtype=torch.float64)
    after = torch.tensor(pairs(lengths[balanced_order(lengths, 4, "zigzag")], 4, "zigzag"), dtype=torch.float64)
    assert before.max() / before.mean() > 1.4 and after.max() / after.mean() < 1.1


def test_reorder_documents_moves_whole_documents():
    gen = torch.Generator().manual_seed(3)
    lengths = random_lengths(gen, 9, 1, "contiguous")
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    order = torch.randperm(9, generator=gen)
    new_cu, source = reorder_documents(cu.to(torch.int32), order)
    assert new_cu.tolist() == [0] + lengths[order].cumsum(0).tolist()
    expected = torch.cat([torch.arange(int(cu[d]), int(cu[d + 1])) for d in order.tolist()])
    assert source.tolist() == expected.tolist()
    with pytest.raises(ValueError, match="order must be a permutation of the 9 documents"):
        reorder_documents(cu, torch.tensor([0] * 9))


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="lengths must be a 1-D int32/int64 tensor"):
        balanced_order(torch.tensor([2.0, 2.0]), 2, "zigzag")
    with pytest.raises(ValueError, match="lengths must all be >= 1"):
        balanced_order(torch.tensor([4, 0, 4]), 2, "zigzag")
    with pytest.raises(ValueError, match="total length 6 must split into the 4 pieces of layout='zigzag'"):
        balanced_order(torch.tensor([3, 3]), 2, "zigzag")
    with pytest.raises(ValueError, match="world must be an integer >= 1"):
        balanced_order(torch.tensor([3, 3]), 0, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        balanced_order(torch.tensor([3, 3]), 2, "ring")
    with pytest.raises(ValueError, match="BalanceSearch.rounds must be an integer >= 0"):
        BalanceSearch(rounds=-1)


def test_benchmark_balanced_rows_never_above_their_layout(capsys):
    from benchmarks import packed_balance
    packed_balance.main(["--total", "4096", "--worlds", "2", "4", "--doc-lens", "64", "512", "--seeds", "2"])
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [float(x) for x in line.split("|")[3:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| mean")}
    assert len(rows) == 8
    for (docs, layout), cells in rows.items():
        if layout.endswith("balanced"):
            given = rows[(docs, layout.split()[0])]
            assert all(b <= g for b, g in zip(cells, given)) and cells != given, (docs, layout)
