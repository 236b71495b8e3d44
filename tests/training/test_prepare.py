"""prepare-data: text files (binaries and non-UTF-8 skipped and reported), JSON Lines, Parquet, saved Hugging
Face datasets (only where `datasets` is installed), a tokenizer.json, EOS after every document, shards read as
one corpus, progress lines, and errors that name the path and leave no temporary files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from longscan.training.data import BYTE_EOS, DataError, open_token_file
from longscan.training.prepare import PrepareOptions, cmd_prepare_data, prepare_data


def _prep(tmp_path, *inputs, **kw):
    return prepare_data(PrepareOptions(inputs=tuple(str(i) for i in inputs), output=str(tmp_path / "out.bin"), **kw))


def _stream(tmp_path):
    toks, meta = open_token_file(str(tmp_path / "out.bin"), full_check=True)
    return np.asarray(toks[np.arange(len(toks))]).tolist(), meta


def _bytes_then_eos(*docs: bytes) -> list[int]:
    return [t for d in docs for t in list(d) + [BYTE_EOS]]


def _leftovers(d) -> list[str]:
    return [n for n in os.listdir(d) if n.startswith(".")]


def test_prepare_data_byte_level(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"hello")
    (tmp_path / "docs" / "b.txt").write_bytes("\u00e9xy".encode())  # non-ASCII UTF-8: bytes, not characters
    meta = _prep(tmp_path, tmp_path / "docs")
    toks, m = open_token_file(str(tmp_path / "out.bin"))
    assert m["dtype"] == "uint16" and m["vocab_size"] == 257 and meta["files"] == 2
    assert toks.tolist() == list(b"hello") + [BYTE_EOS] + list(b"\xc3\xa9xy") + [BYTE_EOS]


def test_binary_and_non_utf8_files_are_skipped_and_reported(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"text one")
    (tmp_path / "docs" / "b.bin").write_bytes(b"ab\x00cd")
    (tmp_path / "docs" / "c.txt").write_bytes(b"\xffxy")
    (tmp_path / "docs" / "d.txt").write_bytes(b"text two")
    meta = _prep(tmp_path, tmp_path / "docs")
    assert _stream(tmp_path)[0] == _bytes_then_eos(b"text one", b"text two")
    assert [(os.path.basename(p), why.split(" ")[0]) for p, why in meta["skipped"]] == [("b.bin", "contains"),
                                                                                        ("c.txt", "not")]
    assert cmd_prepare_data(["--output", str(tmp_path / "o2.bin"), str(tmp_path / "docs")]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "b.bin: contains NUL bytes" in err and "c.txt: not UTF-8" in err
    with pytest.raises(DataError, match="no documents were read"):
        _prep(tmp_path, tmp_path / "docs" / "b.bin")
    assert _leftovers(tmp_path) == []


def test_jsonl_field_and_its_errors(tmp_path):
    rows = [{"text": "first doc", "id": 1}, {"text": "second", "id": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    _prep(tmp_path, tmp_path / "a.jsonl")
    assert _stream(tmp_path)[0] == _bytes_then_eos(b"first doc", b"second")
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n')
    _prep(tmp_path, tmp_path / "b.jsonl", text_field="body")
    assert _stream(tmp_path)[0] == _bytes_then_eos(b"x")
    with pytest.raises(DataError, match=r"b\.jsonl:1: expected an object with a string field 'text'"):
        _prep(tmp_path, tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not a JSON line"):
        _prep(tmp_path, tmp_path / "a.jsonl", tmp_path / "c.jsonl")  # fails after writing a.jsonl's tokens
    assert _leftovers(tmp_path) == []
    assert _stream(tmp_path)[0] == _bytes_then_eos(b"x")  # the previous output is untouched


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    meta = _prep(tmp_path, tmp_path / "d.parquet")
    assert _stream(tmp_path)[0] == _bytes_then_eos(b"alpha", b"beta") and meta["documents"] == 2
    with pytest.raises(DataError, match=r"d\.parquet: no column 'body' .*columns: text, n"):
        _prep(tmp_path, tmp_path / "d.parquet", text_field="body")


def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")  # an optional extra, not in dev: tested where installed
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["one", "two"]}),
                              "test": datasets.Dataset.from_dict({"text": ["three"]})})
    d.save_to_disk(str(tmp_path / "ds"))
    _prep(tmp_path, tmp_path / "ds")
    assert _stream(tmp_path)[0] == _bytes_then_eos(b"one", b"two")
    _prep(tmp_path, tmp_path / "ds", hf_split="test")
    assert _stream(tmp_path)[0] == _bytes_then_eos(b"three")


def _tokenizer(path, with_eos: bool):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    if with_eos:
        vocab["</s>"] = 4
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.mark.parametrize("with_eos", [True, False])
def test_tokenizer_json(tmp_path, with_eos):
    _tokenizer(tmp_path / "tok.json", with_eos)
    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n{"text": "world again zzz"}\n')
    meta = _prep(tmp_path, tmp_path / "a.jsonl", tokenizer=str(tmp_path / "tok.json"))
    eos = 4  # the tokenizer's </s>, or one id past its vocabulary
    assert (meta["vocab_size"], meta["eos"]) == (5, eos)
    assert _stream(tmp_path)[0] == [1, 2, eos, 2, 3, 0, eos]


def test_shards_hold_the_same_stream(tmp_path):
    (tmp_path / "docs").mkdir()
    texts = [f"document {i} " * (i + 1) for i in range(12)]
    for i, t in enumerate(texts):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(t)
    whole = _bytes_then_eos(*(t.encode() for t in texts))
    meta = _prep(tmp_path, tmp_path / "docs", shard_tokens=100)
    shards = meta["shards"]
    assert len(shards) > 3 and all(s["num_tokens"] >= 100 for s in shards[:-1])
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("out.bin.0")) == [s["file"] for s in shards]
    assert not os.path.exists(tmp_path / "out.bin")
    got, m = _stream(tmp_path)
    assert got == whole and m["num_tokens"] == len(whole)
    first = np.fromfile(tmp_path / shards[0]["file"], dtype=np.uint16)
    assert first[-1] == BYTE_EOS  # shards end at document boundaries
    _prep(tmp_path, tmp_path / "docs")  # one file again: the shards of the earlier run are removed
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("out.bin")) == ["out.bin", "out.bin.json"]
    assert _stream(tmp_path)[0] == whole


def test_bad_paths_are_named_before_reading(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="input .*missing_dir.* does not exist"):
        _prep(tmp_path, tmp_path / "missing_dir")
    with pytest.raises(DataError, match=r"--tokenizer '.*nope\.json' does not exist"):
        _prep(tmp_path, tmp_path / "a.txt", tokenizer=str(tmp_path / "nope.json"))
    (tmp_path / "outdir").mkdir()
    with pytest.raises(DataError, match=r"--output '.*outdir' is a directory"):
        prepare_data(PrepareOptions(inputs=(str(tmp_path / "a.txt"),), output=str(tmp_path / "outdir")))
    assert _leftovers(tmp_path) == []


def test_progress_lines(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(600)))
    _prep(tmp_path, tmp_path / "a.jsonl", progress_every=0.0)
    err = capsys.readouterr().err
    assert "prepare-data:" in err and "600 documents" in err and "tokens/s" in err
