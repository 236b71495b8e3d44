"""Document maps of a layout against brute force over random document lengths (no processes needed)."""
import pytest
import torch

from longscan.distributed.documents import check_cu_seqlens, document_positions, local_documents
from longscan.distributed.layouts import num_segments, segment_ids


def random_cu(total, gen, max_len):
    lens, left = [], total
    while left:
        n = int(torch.randint(1, max_len + 1, (1,), generator=gen))
        lens.append(min(n, left))
        left -= lens[-1]
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32)


CASES = [(w, layout, t, max_len, seed) for w in (1, 2, 3, 4) for layout in ("contiguous", "zigzag")
         for t, max_len in ((8, 1), (8, 3), (12, 40)) for seed in (0, 1)]


@pytest.mark.parametrize("world,layout,t_local,max_len,seed", CASES)
def test_local_documents_brute_force(world, layout, t_local, max_len, seed):
    gen = torch.Generator().manual_seed(seed + 7 * world + t_local)
    total = world * t_local
    cu = random_cu(total, gen, max_len)
    starts = cu.tolist()
    doc_of = [max(i for i, s in enumerate(starts[:-1]) if s <= t) for t in range(total)]
    n = num_segments(world, layout)
    seg = total // n
    for causal in (True, False):
        for rank in range(world):
            m = local_documents(cu, t_local, world, rank, layout, causal)
            gpos = [s * seg + i for s in segment_ids(rank, world, layout) for i in range(seg)]
            assert m.doc_ids.tolist() == [doc_of[g] for g in gpos]
            assert m.positions.tolist() == [g - starts[doc_of[g]] for g in gpos]
            # spans cover each local piece, one run per document, in order
            for slot, spans in enumerate(m.spans):
                covered = []
                for d, lo, hi in spans:
                    assert all(doc_of[gpos[i]] == d for i in range(lo, hi))
                    covered += range(lo, hi)
                assert covered == list(range(slot * seg, (slot + 1) * seg))
                assert len({d for d, _, _ in spans}) == len(spans)
            # visible pairs: some query i of piece a sees some key j of piece b
            want = {(a, b) for a in range(n) for b in range(n)
                    if any(doc_of[i] == doc_of[j] and (j <= i or not causal)
                           for i in range(a * seg, (a + 1) * seg) for j in range(b * seg, (b + 1) * seg))}
            assert m.visible == want


def test_positions_restart_per_document():
    cu = torch.tensor([0, 3, 4, 9])
    assert document_positions(cu, 9).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]


def test_bad_cu_seqlens():
    with pytest.raises(ValueError, match="end at the global length 8"):
        check_cu_seqlens(torch.tensor([0, 3, 7]), 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        check_cu_seqlens(torch.tensor([0, 3, 3, 8]), 8)
    with pytest.raises(ValueError, match="int32/int64"):
        check_cu_seqlens(torch.tensor([0.0, 8.0]), 8)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        check_cu_seqlens([0, 8], 8)


def test_causal_pairs_per_rank_hand_counted():
    from longscan.distributed.documents import causal_pairs_per_rank
    cu = torch.tensor([0, 3, 8])     # pairs seen per token: 1 2 3 | 1 2 3 4 5
    assert causal_pairs_per_rank(cu, 8, 2, "contiguous") == [7, 14]
    assert causal_pairs_per_rank(cu, 8, 2, "zigzag") == [12, 9]      # tokens 0 1 6 7 | 2 3 4 5
    one = causal_pairs_per_rank(torch.tensor([0, 8]), 8, 2, "zigzag")
    assert one == [1 + 2 + 7 + 8, 3 + 4 + 5 + 6]                     # zigzag balances one document
    with pytest.raises(ValueError, match="must split over 3 ranks"):
        causal_pairs_per_rank(cu, 8, 3, "zigzag")


def test_cached_on_a_tensor_until_it_changes_or_goes():
    """cached_on builds once per tensor and key, again after an in-place change, and forgets a freed tensor."""
    import gc

    from longscan.distributed import documents
    from longscan.parallel.softmax.common import sp_documents
    builds = []
    cu = torch.tensor([0, 3, 8])
    make = lambda: builds.append(1) or len(builds)    # noqa: E731
    assert documents.cached_on(cu, ("k",), make) == 1
    assert documents.cached_on(cu, ("k",), make) == 1 and len(builds) == 1
    assert documents.cached_on(cu, ("other",), make) == 2
    cu[1] = 4                                                   # a new version: rebuilt
    assert documents.cached_on(cu, ("k",), make) == 3
    assert documents.cached_on(cu.clone(), ("k",), make) == 4   # another tensor, equal values: its own entry
    # the SP softmax methods' documents: one object for every call with this tensor (the layers of a step)
    a = sp_documents(cu, 4, 2, "zigzag", True, "cpu")
    assert sp_documents(cu, 4, 2, "zigzag", True, "cpu") is a
    assert torch.equal(a.of_rank(1, 4), torch.tensor([0, 0, 1, 1], dtype=torch.int32))   # pieces 1 and 2
    ident = id(cu)
    del cu, a
    gc.collect()
    assert ident not in documents._CACHE
