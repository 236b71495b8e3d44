"""Unit: token files checked against their metadata, shard files read as one stream, the stdlib corpus,
packing, the split, and per-rank shards with global labels. (Building token files: test_prepare.py.)"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from longscan.distributed.layouts import segment_ids
from longscan.training.data import BYTE_EOS, DataError, PackedData, open_token_file, stdlib_files, stdlib_token_file


def _positions(seq_len, rank, world, layout):
    """Global positions of a rank's tokens, written out from the layout definition (docs/design.md)."""
    segs = segment_ids(rank, world, layout)
    n = world * len(segs)
    piece = seq_len // n
    return np.concatenate([np.arange(s * piece, (s + 1) * piece) for s in segs])


def test_missing_token_file_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="does not exist; build it with `longscan prepare-data"):
        open_token_file(str(tmp_path / "nope.bin"))


def _token_file(tmp_path, ids, dtype="uint16", vocab=257, **meta):
    path = tmp_path / "t.bin"
    np.asarray(ids, dtype=dtype).tofile(path)
    info = {"dtype": dtype, "vocab_size": vocab, "eos": 256, "num_tokens": len(ids)}
    info.update(meta)
    (tmp_path / "t.bin.json").write_text(json.dumps(info))
    return str(path)


def test_token_file_checked_against_its_metadata(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 257, 5000)
    path = _token_file(tmp_path, ids)
    toks, meta = open_token_file(path)
    assert np.array_equal(np.asarray(toks), ids) and meta["num_tokens"] == 5000
    with open(path, "r+b") as f:  # truncated to half: trained on half before
        f.truncate(5000)
    with pytest.raises(DataError, match=r"t\.bin' has 5,000 bytes, but .* 5,000 tokens of uint16 = 10,000 bytes"):
        open_token_file(path)
    path = _token_file(tmp_path, ids, dtype="uint16")
    meta_file = tmp_path / "t.bin.json"
    meta_file.write_text(json.dumps(dict(meta, dtype="uint32")))  # wrong dtype: read zeros before
    with pytest.raises(DataError, match="truncated or the metadata is not its own"):
        open_token_file(path)
    meta_file.write_text(json.dumps(dict(meta, dtype="float32")))
    with pytest.raises(DataError, match=r"t\.bin\.json'.*dtype 'float32' is not a token dtype"):
        open_token_file(path)
    meta_file.write_text("{not json")
    with pytest.raises(DataError, match="cannot read the token metadata"):
        open_token_file(path)


def test_out_of_range_ids_are_found_at_load(tmp_path):
    ids = np.random.default_rng(1).integers(0, 200, 400_000)
    ids[0] = 300  # in the first sampled block
    path = _token_file(tmp_path, ids, vocab=257)
    with pytest.raises(DataError, match=r"t\.bin'.*token id 300 \(near position 0\) is not below the vocabulary "
                                        r"size 257"):
        open_token_file(path)
    ids[0], ids[100_001] = 5, 999  # between sampled blocks: only the full check reads it
    path = _token_file(tmp_path, ids, vocab=257)
    open_token_file(path)
    with pytest.raises(DataError, match="token id 999 .near position 100001"):
        open_token_file(path, full_check=True)


def test_shards_read_as_one_stream(tmp_path):
    rng = np.random.default_rng(2)
    parts = [rng.integers(0, 257, n) for n in (70, 1, 130)]
    for i, part in enumerate(parts):
        np.asarray(part, dtype=np.uint16).tofile(tmp_path / f"c.bin.{i:05d}")
    (tmp_path / "c.bin.json").write_text(json.dumps({
        "dtype": "uint16", "vocab_size": 257, "eos": 256, "num_tokens": 201,
        "shards": [{"file": f"c.bin.{i:05d}", "num_tokens": len(p)} for i, p in enumerate(parts)]}))
    toks, _ = open_token_file(str(tmp_path / "c.bin"))
    whole = np.concatenate(parts)
    idx = rng.integers(0, 201, (3, 17))
    assert len(toks) == 201 and np.array_equal(toks[idx], whole[idx]) and np.array_equal(toks[60:80], whole[60:80])
    d, w = PackedData(toks, 16, 0.1, 3, np.arange(16)), PackedData(whole, 16, 0.1, 3, np.arange(16))
    assert torch.equal(d.rows([3, 4, 11]).tokens, w.rows([3, 4, 11]).tokens)  # rows across shard ends
    assert torch.equal(d.rows([3, 4, 11]).labels, w.rows([3, 4, 11]).labels)
    os.remove(tmp_path / "c.bin.00001")
    with pytest.raises(DataError, match=r"c\.bin\.00001' listed in .* does not exist"):
        open_token_file(str(tmp_path / "c.bin"))


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
