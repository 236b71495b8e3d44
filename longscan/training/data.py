"""Token data for training: the embedded stdlib corpus, memory-mapped token files (checked against their
metadata), packing, sharded batches. Building token files from users' data is in prepare.py.

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
# A token file is a raw array of token ids (``dtype``) next to ``<path>.json``: {"dtype", "vocab_size", "eos",
# "num_tokens"}, plus "shards": [{"file", "num_tokens"}, ...] when the stream is split over several files
# (names relative to the metadata's directory; no file at ``path`` itself). Training reads the shards in
# order as one stream.

TOKEN_DTYPES = ("uint16", "uint32")
SAMPLE_BLOCKS, SAMPLE_BLOCK = 64, 4096  # ids checked at load: this many evenly spaced blocks of this many


def meta_path(path: str) -> str:
    """Where a token file's metadata lives."""
    return path + ".json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest stored dtype that holds ids below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def write_token_file(path: str, docs, vocab_size: int, eos: int) -> dict:
    """Write documents (iterables of int token ids) as one EOS-separated stream; atomic (temp + rename).

    The stream is raw uint16 (vocab <= 65536) or uint32; ``<path>.json`` holds dtype, vocab_size, eos and
    the token count. Returns that metadata.
    """
    dtype = token_dtype(vocab_size)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    n = 0
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tokens-")
    tmp_meta = ""
    try:
        with os.fdopen(fd, "wb") as f:
            for doc in docs:
                arr = np.asarray(doc, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                    raise DataError(f"token id out of range [0, {vocab_size}) while writing {path}")
                f.write(np.append(arr, eos).astype(dtype).tobytes())
                n += arr.size + 1
        meta = {"dtype": dtype.name, "vocab_size": vocab_size, "eos": eos, "num_tokens": n}
        fd, tmp_meta = tempfile.mkstemp(dir=d, prefix=".meta-")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
    except BaseException:
        for t in (tmp, tmp_meta):
            if t and os.path.exists(t):
                os.unlink(t)
        raise
    os.replace(tmp, path)  # data first: the metadata file appearing means both are complete
    os.replace(tmp_meta, meta_path(path))
    return meta


class ShardedTokens:
    """Token files read as one stream: ``len()`` and indexing by integer arrays or slices, like one array."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.ends = np.cumsum([len(a) for a in arrays])
        self.starts = self.ends - np.array([len(a) for a in arrays])
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)})")
        which = np.searchsorted(self.ends, idx, side="right")
        out = np.empty(idx.shape, dtype=self.dtype)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.arrays[s][idx[sel] - self.starts[s]]
        return out


def _read_meta(path: str) -> dict:
    mp = meta_path(path)
    try:
        with open(mp) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the token metadata {mp!r}: {e}") from e
    dtype, vocab, eos, n = (meta.get(k) for k in ("dtype", "vocab_size", "eos", "num_tokens"))
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{mp!r}: dtype {dtype!r} is not a token dtype; expected one of {', '.join(TOKEN_DTYPES)}")
    if not isinstance(vocab, int) or not 0 < vocab <= np.iinfo(dtype).max + 1:
        raise DataError(f"{mp!r}: vocab_size {vocab!r} must be an integer in [1, {np.iinfo(dtype).max + 1}] "
                        f"for dtype {dtype}")
    if not isinstance(eos, int) or not 0 <= eos < vocab:
        raise DataError(f"{mp!r}: eos {eos!r} must be an integer below vocab_size {vocab}")
    if not isinstance(n, int) or n < 0:
        raise DataError(f"{mp!r}: num_tokens {n!r} must be a non-negative integer")
    return meta


def token_files(path: str, meta: dict) -> list[tuple[str, int]]:
    """(file, token count) of each piece of the stream described by ``path``'s metadata."""
    if "shards" not in meta:
        return [(path, meta["num_tokens"])]
    d = os.path.dirname(os.path.abspath(path))
    files = [(os.path.join(d, s["file"]), s["num_tokens"]) for s in meta["shards"]]
    if sum(n for _, n in files) != meta["num_tokens"]:
        raise DataError(f"{meta_path(path)!r}: its shards hold {sum(n for _, n in files)} tokens, its num_tokens "
                        f"says {meta['num_tokens']}")
    return files


def check_ids(tokens, vocab_size: int, name: str, sample: bool) -> None:
    """Every id (sample=False) or evenly spaced blocks of ids (sample=True) are below ``vocab_size``."""
    n = len(tokens)
    if sample and n > SAMPLE_BLOCKS * SAMPLE_BLOCK:
        starts = np.linspace(0, n - SAMPLE_BLOCK, SAMPLE_BLOCKS).astype(np.int64)
    else:
        starts = np.arange(0, n, 1 << 22)
    block = SAMPLE_BLOCK if sample and n > SAMPLE_BLOCKS * SAMPLE_BLOCK else 1 << 22
    for s in starts:
        ids = np.asarray(tokens[s:s + block])
        if ids.size and int(ids.max()) >= vocab_size:
            i = int(s + np.argmax(ids >= vocab_size))
            raise DataError(f"{name!r}: token id {int(ids.max())} (near position {i}) is not below the vocabulary "
                            f"size {vocab_size} its metadata gives; the file and its metadata do not belong "
                            "together: rebuild them with `longscan prepare-data`")


def open_token_file(path: str, full_check: bool = False):
    """Memory-map a token file (or the shards it lists) -> (tokens, metadata).

    Checks the metadata against the files: dtype, each file's size = token count × dtype size, and ids below
    the vocabulary (sampled blocks; every id with ``full_check``). Errors name the file.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(meta_path(path)):
        if not os.path.isfile(path):
            raise DataError(f"data.path {path!r} does not exist; build it with "
                            f"`longscan prepare-data --output {path} FILES_OR_DIRS...`")
        raise DataError(f"{meta_path(path)!r} (dtype, vocab) is missing next to the token file {path!r}; "
                        "rebuild it with `longscan prepare-data`")
    meta = _read_meta(path)
    dtype = np.dtype(meta["dtype"])
    arrays = []
    for f, n in token_files(path, meta):
        if not os.path.isfile(f):
            raise DataError(f"token file {f!r} listed in {meta_path(path)!r} does not exist")
        size = os.path.getsize(f)
        if size != n * dtype.itemsize:
            raise DataError(f"token file {f!r} has {size:,} bytes, but {meta_path(path)!r} describes {n:,} tokens of "
                            f"{dtype.name} = {n * dtype.itemsize:,} bytes: the file is truncated or the metadata is "
                            "not its own; rebuild it with `longscan prepare-data`")
        arr = np.memmap(f, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype)
        check_ids(arr, meta["vocab_size"], f, sample=not full_check)
        arrays.append(arr)
    if meta["num_tokens"] == 0:
        raise DataError(f"token file {path!r} holds no tokens")
    return (arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)), meta


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
    if not (os.path.isfile(path) and os.path.isfile(meta_path(path))):
        write_token_file(path, byte_docs(files), BYTE_VOCAB, BYTE_EOS)
    return path


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
