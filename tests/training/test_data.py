"""Unit: token files, the stdlib corpus, packing, the split, and per-rank shards with global labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from longscan.distributed.layouts import segment_ids
from longscan.training.data import (BYTE_EOS, DataError, PackedData, open_token_file, prepare_data,
                                    stdlib_files, stdlib_token_file)


def _positions(seq_len, rank, world, layout):
    """Global positions of a rank's tokens, written out from the layout definition (docs/design.md)."""
    segs = segment_ids(rank, world, layout)
    n = world * len(segs)
    piece = seq_len // n
    return np.concatenate([np.arange(s * piece, (s + 1) * piece) for s in segs])


def test_prepare_data_byte_level(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"hello")
    (tmp_path / "docs" / "b.txt").write_bytes(b"\xffxy")
    meta = prepare_data([str(tmp_path / "docs")], str(tmp_path / "out.bin"))
    toks, m = open_token_file(str(tmp_path / "out.bin"))
    assert m["dtype"] == "uint16" and m["vocab_size"] == 257 and meta["files"] == 2
    assert toks.tolist() == list(b"hello") + [BYTE_EOS] + list(b"\xffxy") + [BYTE_EOS]


def test_missing_token_file_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="does not exist; build it with `longscan prepare-data"):
        open_token_file(str(tmp_path / "nope.bin"))
    with pytest.raises(DataError, match="input .* does not exist"):
        prepare_data([str(tmp_path / "missing_dir")], str(tmp_path / "x.bin"))


def test_stdlib_corpus_is_deterministic(tmp_path):
    files = stdlib_files()
    assert len(files) > 100 and files == stdlib_files()
    path = stdlib_token_file(str(tmp_path))
    toks, meta = open_token_file(path)
    first = open(files[0], "rb").read()
    assert toks[:len(first)].tolist() == list(first) and toks[len(first)] == BYTE_EOS
    assert meta["num_tokens"] == len(toks) > 1_000_000
    assert stdlib_token_file(str(tmp_path)) == path  # cached


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_cover_the_sequence_with_global_next_token_labels(layout, world):
    L = 32
    stream = np.arange(10_000, dtype=np.uint32) * 7 % 9973  # distinct-ish values: positions are traceable
    seen = {}
    for r in range(world):
        pos = _positions(L, r, world, layout)
        d = PackedData(stream, L, 0.1, seed=3, positions_=pos)
        mb = d.rows([5, 9])
        for b, seq in enumerate([5, 9]):
            for j, p in enumerate(pos):
                assert mb.tokens[b, j] == stream[seq * L + p]
                assert mb.labels[b, j] == stream[seq * L + p + 1]  # next *global* token
                seen[(seq, int(p))] = True
    assert len(seen) == 2 * L  # every position read exactly once across ranks


def test_split_order_and_dp_partition():
    stream = np.arange(100 * 16 + 1, dtype=np.uint32)
    pos = np.arange(16)
    d = PackedData(stream, 16, 0.1, seed=7, positions_=pos)
    assert (d.n_train, d.n_val) == (90, 10)
    first = lambda mbs: [int(m.tokens[i, 0]) // 16 for m in mbs for i in range(m.tokens.shape[0])]
    full = first(d.train_microbatches(3, 8, 2, 0, 1))
    halves = first(d.train_microbatches(3, 8, 2, 0, 2)) + first(d.train_microbatches(3, 8, 2, 1, 2))
    assert full == halves and len(set(full)) == 8 and max(full) < 90  # DP ranks split one global batch
    again = PackedData(stream, 16, 0.1, seed=7, positions_=pos)
    assert first(again.train_microbatches(3, 8, 2, 0, 1)) == full  # a pure function of (seed, step)
    val = first(d.val_microbatches(0, 8, 8, 0, 1))
    assert min(val) >= 90  # validation sequences are never trained on
    epoch2 = first(d.train_microbatches(12, 8, 8, 0, 1))  # flat index 96.. wraps into a new epoch
    assert max(epoch2) < 90
    assert isinstance(d.rows([0]).tokens, torch.Tensor) and d.rows([0]).tokens.dtype == torch.int64
