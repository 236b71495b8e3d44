"""Token data: the embedded stdlib corpus, memory-mapped token files, packing, sharded batches.

Documents are concatenated with an EOS token between them and cut into sequences of ``seq_len`` tokens;
sequence i covers stream tokens [i·L, (i+1)·L] (L+1 tokens: inputs and the next-token labels). The last
``val_fraction`` of the sequences are the validation split. Each rank reads only the tokens of its SP
shard: the global positions come from ``layouts.positions`` and the labels are the *next global* tokens
(shifted before sharding, so the last token of a zigzag piece gets the first token of the next piece).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from longscan.distributed.layouts import positions

BYTE_EOS = 256
BYTE_VOCAB = 257  # 256 byte values + EOS


class DataError(ValueError):
    """Missing or malformed data; the message says what to run."""


# ---------------------------------------------------------------- token files ----------------------------

def _meta_path(path: str) -> str:
    return path + ".json"


def write_token_file(path: str, docs, vocab_size: int, eos: int) -> dict:
    """Write documents (iterables of int token ids) as one EOS-separated stream; atomic (temp + rename).

    The stream is raw uint16 (vocab <= 65536) or uint32; ``<path>.json`` holds dtype, vocab_size, eos and
    the token count. Returns that metadata.
    """
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    n = 0
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tokens-")
    with os.fdopen(fd, "wb") as f:
        for doc in docs:
            arr = np.asarray(doc, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise DataError(f"token id out of range [0, {vocab_size}) while writing {path}")
            f.write(np.append(arr, eos).astype(dtype).tobytes())
            n += arr.size + 1
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "eos": eos, "num_tokens": n}
    fd, tmp_meta = tempfile.mkstemp(dir=d, prefix=".meta-")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, path)  # data first: the metadata file appearing means both are complete
    os.replace(tmp_meta, _meta_path(path))
    return meta


def open_token_file(path: str) -> tuple[np.memmap, dict]:
    """Memory-map a token file written by :func:`write_token_file` -> (tokens, metadata)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataError(f"data.path {path!r} does not exist; build it with "
                        f"`longscan prepare-data --output {path} FILES_OR_DIRS...`")
    if not os.path.isfile(_meta_path(path)):
        raise DataError(f"{_meta_path(path)!r} (dtype, vocab) is missing next to the token file {path!r}; "
                        "rebuild it with `longscan prepare-data`")
    with open(_meta_path(path)) as f:
        meta = json.load(f)
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r"), meta


# ---------------------------------------------------------------- corpora -------------------------------

def stdlib_files() -> list[str]:
    """The Python standard library's .py files on this machine, sorted by relative path."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return sorted(out, key=lambda p: os.path.relpath(p, root))


def byte_docs(files):
    """Each file's bytes as a document of byte tokens."""
    for f in files:
        with open(f, "rb") as fh:
            yield np.frombuffer(fh.read(), dtype=np.uint8)


def stdlib_token_file(cache_dir: str) -> str:
    """Path of the byte-level stdlib corpus, built once into ``cache_dir`` (keyed by the file list)."""
    files = stdlib_files()
    if not files:
        raise DataError(f"no .py files under {sysconfig.get_paths()['stdlib']}; use data.source=tokens")
    h = hashlib.sha1(sys.version.encode())
    for f in files:
        h.update(f.encode())
        h.update(str(os.path.getsize(f)).encode())
    cache = os.path.expanduser(cache_dir)
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError:  # read-only home (some CI/containers): fall back to the temp directory
        cache = os.path.join(tempfile.gettempdir(), "longscan")
    path = os.path.join(cache, f"stdlib-bytes-{h.hexdigest()[:12]}.u16")
    if not (os.path.isfile(path) and os.path.isfile(_meta_path(path))):
        write_token_file(path, byte_docs(files), BYTE_VOCAB, BYTE_EOS)
    return path


def tokenizer_docs(files, tokenizer_path: str):
    """Documents tokenised with a `tokenizers` tokenizer.json -> (docs iterator, vocab size, eos)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise DataError("--tokenizer needs the `tokenizers` package (pip install tokenizers)") from e
    tok = Tokenizer.from_file(tokenizer_path)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = next((tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>") if tok.token_to_id(t) is not None),
               None)
    if eos is None:  # no EOS in the tokenizer: append one after its vocabulary
        eos, vocab = vocab, vocab + 1

    def gen():
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                yield tok.encode(fh.read()).ids
    return gen(), vocab, eos


def list_inputs(inputs: list[str], suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files given directly, plus files under given directories (recursive, sorted, filtered by suffix)."""
    out = []
    for p in inputs:
        if os.path.isdir(p):
            for d, dirs, files in os.walk(p):
                dirs.sort()
                out += [os.path.join(d, f) for f in sorted(files) if not suffixes or f.endswith(suffixes)]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataError(f"input {p!r} does not exist")
    if not out:
        raise DataError(f"no input files found in {inputs}")
    return out


def prepare_data(inputs: list[str], output: str, tokenizer: str | None = None,
                 suffixes: tuple[str, ...] = ()) -> dict:
    """Build a memory-mappable token file from text files (byte-level, or a tokenizer.json)."""
    files = list_inputs(inputs, suffixes)
    if tokenizer:
        docs, vocab, eos = tokenizer_docs(files, tokenizer)
    else:
        docs, vocab, eos = byte_docs(files), BYTE_VOCAB, BYTE_EOS
    meta = write_token_file(output, docs, vocab, eos)
    meta["files"] = len(files)
    return meta


# ---------------------------------------------------------------- batches -------------------------------

@dataclass
class Microbatch:
    """This rank's shard of ``micro_batch_size`` sequences: tokens, labels `[B, T_local]` int64."""
    tokens: torch.Tensor
    labels: torch.Tensor


class PackedData:
    """Packed sequences of one token stream with the deterministic train/validation split and order.

    ``positions`` `[T_local]` are the global positions this rank holds (layouts.positions).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int, positions_: np.ndarray):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        n = (len(tokens) - 1) // seq_len
        self.n_val = max(1, int(n * val_fraction))
        self.n_train = n - self.n_val
        if self.n_train < 1:
            raise DataError(f"the corpus ({len(tokens)} tokens) is too small for seq_len={seq_len}")
        self.pos = positions_.astype(np.int64)
        self._perm_epoch, self._perm = -1, None

    def _train_index(self, flat: int) -> int:
        epoch, i = divmod(flat, self.n_train)
        if epoch != self._perm_epoch:  # a fresh shuffle per epoch, a pure function of (seed, epoch)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def rows(self, seq_indices: list[int]) -> Microbatch:
        starts = np.asarray(seq_indices, dtype=np.int64)[:, None] * self.seq_len
        idx = starts + self.pos[None, :]
        toks = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        labels = torch.from_numpy(np.asarray(self.tokens[idx + 1], dtype=np.int64))
        return Microbatch(toks, labels)

    def train_microbatches(self, step: int, global_batch: int, micro: int, dp_rank: int, dp: int) -> list[Microbatch]:
        """Microbatches of this DP rank for optimizer step ``step`` (0-based)."""
        per = global_batch // dp
        flat = [step * global_batch + dp_rank * per + j for j in range(per)]
        seqs = [self._train_index(f) for f in flat]
        return [self.rows(seqs[i:i + micro]) for i in range(0, per, micro)]

    def val_microbatches(self, batch: int, global_batch: int, micro: int, dp_rank: int, dp: int) -> list[Microbatch]:
        per = global_batch // dp
        seqs = [self.n_train + (batch * global_batch + dp_rank * per + j) % self.n_val for j in range(per)]
        return [self.rows(seqs[i:i + micro]) for i in range(0, per, micro)]


def build_data(data_cfg, sp_group, layout: str, sp: int) -> tuple[PackedData, dict]:
    """Open the configured corpus and return (PackedData for this rank's SP shard, token metadata)."""
    if data_cfg.source == "stdlib":
        path = stdlib_token_file(data_cfg.cache_dir)
    else:
        path = data_cfg.path
    tokens, meta = open_token_file(path)
    local = data_cfg.seq_len // sp
    pos = positions(local, sp_group, layout).numpy()
    return PackedData(tokens, data_cfg.seq_len, data_cfg.val_fraction, data_cfg.seed, pos), meta
