"""The affine All-Scan (the delta rule's collective) against the serial scan of all segments: forward and
reverse, both layouts, every V-block count, and which rank holds the scan's last carry."""
import pytest
import torch

from harness import rel_err, run_distributed
from longscan.distributed.affine_scan import affine_all_scan, serial_affine_scan
from longscan.distributed.layouts import num_segments, segment_ids, segment_owner

LAYOUTS = ("contiguous", "zigzag")


def scan_worker(rank, world):
    """The affine All-Scan alone, forward and reverse, every V-block count, against the serial scan of the
    gathered segments."""
    out = {}
    for layout in LAYOUTS:
        n = num_segments(world, layout)
        gen = torch.Generator().manual_seed(n)
        M = torch.randn(n, 2, 3, 4, 4, generator=gen, dtype=torch.float64) / 2
        S = torch.randn(n, 2, 3, 4, 5, generator=gen, dtype=torch.float64)
        init = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
        mine = segment_ids(rank, world, layout)
        for reverse in (False, True):
            ref, ref_last = serial_affine_scan(M, S, init, reverse)
            for n_blocks in (1, 2, 5):
                got, last = affine_all_scan(M[mine], S[mine], None, layout, n_blocks, init, reverse)
                owner_has_last = last is not None
                errs = [rel_err(got, ref[mine])] + ([rel_err(last, ref_last)] if owner_has_last else [])
                out[(layout, reverse, n_blocks)] = (max(errs), owner_has_last)
    return out


@pytest.mark.parametrize("world", [3])
def test_affine_all_scan_matches_serial(world):
    per_rank = run_distributed(scan_worker, world)
    for key in per_rank[0]:
        layout, reverse, _ = key
        n = num_segments(world, layout)
        end = segment_owner(0 if reverse else n - 1, world, layout)[0]
        for rank, res in enumerate(per_rank):
            err, has_last = res[key]
            assert err <= 1e-12 and has_last == (rank == end), (rank, key, err, has_last)


def test_serial_affine_scan_is_the_recurrence():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(3, 1, 1, 2, 2, generator=gen, dtype=torch.float64)
    S = torch.randn(3, 1, 1, 2, 2, generator=gen, dtype=torch.float64)
    carries, last = serial_affine_scan(M, S)
    assert torch.equal(carries[0], torch.zeros_like(S[0])) and torch.equal(carries[1], S[0])
    assert torch.allclose(carries[2], M[1] @ S[0] + S[1])
    assert torch.allclose(last, M[2] @ carries[2] + S[2])
    back, first = serial_affine_scan(M, S, reverse=True)
    assert torch.equal(back[2], torch.zeros_like(S[0])) and torch.allclose(first, M[0] @ back[0] + S[0])
