"""`longscan prepare-data`: users' text -> a token file (or shards) that training memory-maps.

Inputs, each a path: text files (directories are searched recursively, sorted; files that are not UTF-8
text, or contain NUL bytes, are skipped and listed), JSON Lines (``.jsonl``, one object per line, the text
in ``text_field``), Parquet (``.parquet``, the text column ``text_field``; needs pyarrow) and Hugging Face
datasets saved with ``save_to_disk`` (a directory holding ``dataset_info.json`` or ``dataset_dict.json``;
needs datasets). Every document is tokenised (bytes, or any ``tokenizers`` tokenizer.json) and followed by
EOS, so packing keeps document boundaries. Files are written under temporary names and renamed at the end;
nothing is left behind on error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from longscan.training.data import BYTE_EOS, BYTE_VOCAB, DataError, meta_path, token_dtype

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")
BATCH_DOCS = 256  # documents tokenised per call (the tokenizers library parallelises a batch)


@dataclass(frozen=True)
class PrepareOptions:
    """What `longscan prepare-data` reads and writes."""
    inputs: tuple[str, ...]
    """Files or directories (text files found recursively), .jsonl / .parquet files, saved HF datasets."""
    output: str
    """Token file to write; its metadata goes to ``output + ".json"``."""
    tokenizer: str = ""
    """A `tokenizers` tokenizer.json ('' = bytes, vocabulary 257 with EOS 256)."""
    suffixes: tuple[str, ...] = ()
    """Keep only files with these suffixes when searching directories (() = every file)."""
    input_format: str = "auto"
    """auto (by suffix / directory content) | text | jsonl | parquet | hf."""
    text_field: str = "text"
    """The JSON key / Parquet column / dataset column holding a document's text."""
    hf_split: str = "train"
    """The split read from a saved DatasetDict."""
    shard_tokens: int = 0
    """Start a new shard file once one holds this many tokens (at a document boundary); 0 = one file."""
    progress_every: float = 5.0
    """Seconds between progress lines on stderr."""

    def __post_init__(self):
        if not self.inputs:
            raise DataError("prepare-data needs at least one input")
        if self.input_format not in FORMATS:
            raise DataError(f"--format {self.input_format!r} is not one of {', '.join(FORMATS)}")
        if self.shard_tokens < 0:
            raise DataError(f"--shard-tokens must be >= 0, got {self.shard_tokens}")
        if os.path.isdir(self.output):
            raise DataError(f"--output {self.output!r} is a directory; give a file name such as {self.output}/c.bin")
        if self.tokenizer and not os.path.isfile(self.tokenizer):
            raise DataError(f"--tokenizer {self.tokenizer!r} does not exist (expected a tokenizers tokenizer.json)")


@dataclass
class Report:
    """What was read: counts and the files skipped (path, reason)."""
    files: int = 0
    documents: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------- sources -------------------------------

def _is_hf_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n))
                                       for n in ("dataset_info.json", "dataset_dict.json"))


def _format_of(path: str, forced: str) -> str:
    if forced != "auto":
        return forced
    if _is_hf_dataset(path):
        return "hf"
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return "text"


def list_inputs(inputs, suffixes: tuple[str, ...] = (), forced: str = "auto") -> list[tuple[str, str]]:
    """(path, format) of every source: files given directly, files under directories (recursive, sorted,
    filtered by suffix), saved datasets as one source each."""
    out = []
    for p in inputs:
        if _is_hf_dataset(p) or (forced == "hf" and os.path.isdir(p)):
            out.append((p, "hf"))
        elif os.path.isdir(p):
            for d, dirs, files in os.walk(p):
                dirs.sort()
                out += [(f, _format_of(f, forced)) for f in (os.path.join(d, n) for n in sorted(files))
                        if not suffixes or f.endswith(suffixes)]
        elif os.path.isfile(p):
            out.append((p, _format_of(p, forced)))
        else:
            raise DataError(f"input {p!r} does not exist")
    if not out:
        raise DataError(f"no input files found in {list(inputs)}" + (f" with suffixes {suffixes}" if suffixes else ""))
    return out


def _text_file(path: str, report: Report) -> Iterator[str]:
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:
        report.skipped.append((path, "contains NUL bytes (binary)"))
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.skipped.append((path, f"not UTF-8 (byte {e.start})"))
        return
    yield text


def _jsonl_file(path: str, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{i}: not a JSON line ({e})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise DataError(f"{path}:{i}: expected an object with a string field {key!r} (--jsonl-field)")
            yield obj[key]


def _parquet_file(path: str, key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: Parquet input needs pyarrow: pip install 'longscan[parquet]'") from e
    pf = pq.ParquetFile(path)
    if key not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {key!r} (--jsonl-field); columns: {', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=[key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _hf_dataset(path: str, key: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: a saved Hugging Face dataset needs datasets: pip install 'longscan[datasets]'") from e
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (--hf-split); splits: {', '.join(ds)}")
        ds = ds[split]
    if key not in ds.column_names:
        raise DataError(f"{path}: no column {key!r} (--jsonl-field); columns: {', '.join(ds.column_names)}")
    for batch in ds.select_columns([key]).iter(batch_size=1024):
        yield from (t for t in batch[key] if t is not None)


def documents(sources: list[tuple[str, str]], opts: PrepareOptions, report: Report) -> Iterator[str]:
    """The text of every document, source by source."""
    for path, fmt in sources:
        report.files += 1
        if fmt == "text":
            docs = _text_file(path, report)
        elif fmt == "jsonl":
            docs = _jsonl_file(path, opts.text_field)
        elif fmt == "parquet":
            docs = _parquet_file(path, opts.text_field)
        else:
            docs = _hf_dataset(path, opts.text_field, opts.hf_split)
        for d in docs:
            report.documents += 1
            yield d


# ---------------------------------------------------------------- tokenisers ----------------------------

@dataclass(frozen=True)
class Encoder:
    """Texts -> token id arrays, with the vocabulary size and EOS id the token file records."""
    vocab_size: int
    eos: int
    tokenizer: object = None

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self.tokenizer is None:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(texts)]


def build_encoder(tokenizer_path: str) -> Encoder:
    if not tokenizer_path:
        return Encoder(BYTE_VOCAB, BYTE_EOS)
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise DataError("--tokenizer needs the `tokenizers` package: pip install 'longscan[tokenizers]'") from e
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except Exception as e:  # the library raises a bare Exception for unreadable files
        raise DataError(f"--tokenizer {tokenizer_path!r} is not a tokenizers tokenizer.json: {e}") from e
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = next((tok.token_to_id(t) for t in EOS_NAMES if tok.token_to_id(t) is not None), None)
    if eos is None:  # no EOS in the tokenizer: one more id after its vocabulary
        eos, vocab = vocab, vocab + 1
    return Encoder(vocab, eos, tok)


# ---------------------------------------------------------------- writing -------------------------------

class ShardWriter:
    """EOS-terminated documents -> shard files under temporary names; ``commit`` renames them and writes the
    metadata last, ``abort`` deletes them."""

    def __init__(self, output: str, encoder: Encoder, shard_tokens: int):
        self.output, self.encoder, self.shard_tokens = output, encoder, shard_tokens
        self.dir = os.path.dirname(os.path.abspath(output))
        self.dtype = token_dtype(encoder.vocab_size)
        self.shards: list[tuple[str, int]] = []  # (temporary path, tokens)
        self.file, self.count, self.total = None, 0, 0

    def _open(self):
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".prepare-")
        self.file, self.count = os.fdopen(fd, "wb"), 0
        self.shards.append((tmp, 0))

    def write(self, doc: np.ndarray) -> None:
        if doc.size and (doc.min() < 0 or doc.max() >= self.encoder.vocab_size):
            raise DataError(f"the tokenizer produced id {int(doc.max())}, outside its vocabulary "
                            f"[0, {self.encoder.vocab_size})")
        if self.file is None or (self.shard_tokens and self.count >= self.shard_tokens):
            self._close()
            self._open()
        self.file.write(np.append(doc, self.encoder.eos).astype(self.dtype).tobytes())
        self.count += doc.size + 1
        self.total += doc.size + 1

    def _close(self):
        if self.file is not None:
            self.file.close()
            self.shards[-1] = (self.shards[-1][0], self.count)
            self.file = None

    def _final_names(self) -> list[str]:
        if not self.shard_tokens:
            return [self.output]
        width = max(5, len(str(len(self.shards) - 1)))
        return [f"{self.output}.{i:0{width}d}" for i in range(len(self.shards))]

    def commit(self) -> dict:
        self._close()
        if self.total == 0:
            raise DataError("no documents were read (every input was empty or skipped)")
        meta = {"dtype": self.dtype.name, "vocab_size": self.encoder.vocab_size, "eos": self.encoder.eos,
                "num_tokens": self.total}
        names = self._final_names()
        if self.shard_tokens:
            meta["shards"] = [{"file": os.path.basename(n), "num_tokens": c} for n, (_, c) in zip(names, self.shards)]
        fd, tmp_meta = tempfile.mkstemp(dir=self.dir, prefix=".prepare-")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        self.shards.append((tmp_meta, 0))  # cleaned up with the rest should a rename fail
        for (tmp, _), name in zip(self.shards, names):
            os.replace(tmp, name)
        os.replace(tmp_meta, meta_path(self.output))  # last: its appearance means the data is complete
        self.shards = []
        self._remove_stale({os.path.abspath(n) for n in names})
        return meta

    def _remove_stale(self, written: set[str]) -> None:
        """Files of an earlier prepare-data run to the same output that the new metadata does not list."""
        base = os.path.basename(self.output)
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            stale_shard = name.startswith(base + ".") and name[len(base) + 1:].isdigit()
            if (stale_shard or name == base) and path not in written:
                os.unlink(path)

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        for tmp, _ in self.shards:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.shards = []


class Progress:
    """A line on stderr every ``every`` seconds: documents, tokens, characters read and the rates."""

    def __init__(self, every: float):
        self.every, self.t0 = every, time.monotonic()
        self.last = self.t0

    def update(self, report: Report, tokens: int, nchars: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        print(f"prepare-data: {report.files:,} source(s), {report.documents:,} documents, {tokens:,} tokens, "
              f"{nchars / 1e6:,.1f} M characters | {tokens / dt:,.0f} tokens/s, {nchars / 1e6 / dt:,.2f} M chars/s",
              file=sys.stderr, flush=True)


def prepare_data(opts: PrepareOptions) -> dict:
    """Build the token file(s) of ``opts``; returns the metadata plus "files", "documents", "skipped"."""
    sources = list_inputs(opts.inputs, opts.suffixes, opts.input_format)
    encoder = build_encoder(opts.tokenizer)
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    writer = ShardWriter(opts.output, encoder, opts.shard_tokens)
    report, progress, nchars, batch = Report(), Progress(opts.progress_every), 0, []
    try:
        for text in documents(sources, opts, report):
            batch.append(text)
            nchars += len(text)
            if len(batch) == BATCH_DOCS:
                for doc in encoder.encode(batch):
                    writer.write(doc)
                batch = []
                progress.update(report, writer.total, nchars)
        for doc in encoder.encode(batch):
            writer.write(doc)
        meta = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if time.monotonic() - progress.t0 > opts.progress_every:
        progress.update(report, writer.total, nchars, force=True)
    return dict(meta, files=report.files, documents=report.documents, skipped=report.skipped)


def cmd_prepare_data(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="longscan prepare-data",
                                description="Tokenise text, JSON Lines, Parquet or saved Hugging Face datasets into "
                                            "a memory-mapped token file (or shards) for `longscan train`.")
    p.add_argument("inputs", nargs="+", help="files or directories (searched recursively, sorted), .jsonl, "
                                             ".parquet, or a directory written by datasets' save_to_disk")
    p.add_argument("--output", required=True, help="token file to write (metadata goes to OUTPUT.json)")
    p.add_argument("--tokenizer", default="", help="a `tokenizers` tokenizer.json (default: bytes)")
    p.add_argument("--suffix", default="", help="comma-separated file suffixes to keep in directories")
    p.add_argument("--format", dest="input_format", default="auto", choices=FORMATS,
                   help="input format (default: by suffix: .jsonl, .parquet, saved datasets, else text)")
    p.add_argument("--jsonl-field", "--text-field", dest="text_field", default="text",
                   help="JSON key / Parquet or dataset column holding the text (default: text)")
    p.add_argument("--hf-split", default="train", help="split of a saved DatasetDict (default: train)")
    p.add_argument("--shard-tokens", type=int, default=0,
                   help="write shards of about this many tokens (OUTPUT.00000, ...); training reads them as one")
    a = p.parse_args(argv)
    try:
        opts = PrepareOptions(inputs=tuple(a.inputs), output=a.output, tokenizer=a.tokenizer,
                              suffixes=tuple(s for s in a.suffix.split(",") if s), input_format=a.input_format,
                              text_field=a.text_field, hf_split=a.hf_split, shard_tokens=a.shard_tokens)
        meta = prepare_data(opts)
    except DataError as e:
        print(f"longscan prepare-data: {e}", file=sys.stderr)
        return 2
    for path, why in meta["skipped"][:20]:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if len(meta["skipped"]) > 20:
        print(f"... and {len(meta['skipped']) - 20} more skipped", file=sys.stderr)
    shards = f" in {len(meta['shards'])} shards" if "shards" in meta else ""
    print(f"wrote {a.output}: {meta['num_tokens']:,} tokens{shards} from {meta['documents']:,} documents in "
          f"{meta['files']} files, {len(meta['skipped'])} skipped ({meta['dtype']}, vocab {meta['vocab_size']}, "
          f"eos {meta['eos']}); train with data.source=tokens data.path={a.output} "
          f"model.vocab_size={meta['vocab_size']}")
    return 0
