"""Checkpoints with torch.distributed.checkpoint (DCP): never loaded half-written, corrupt or foreign.

A save goes to ``<dir>/step_<N>.tmp``; after every rank has written its shards, each rank hashes its own
files (sha256), rank 0 writes the ``COMPLETE`` marker (JSON: step, run id, parallel layout, model config,
the sha256 of every file) and renames the directory to ``step_<N>``. Only ``step_<N>`` directories with a
marker are candidates for resume.

Loading never runs code from the directory: every file is checked against the marker's sha256 before
it is read, DCP's ``.metadata`` (a pickle) is unpickled by :class:`MetadataUnpickler`, which admits only
DCP's own metadata classes, and tensors are read by DCP with ``torch.load(weights_only=True)``. A
candidate that fails verification is skipped with a message naming the bad file, and the previous
complete one is tried.

State keys: model parameters and their AdamW moments by parameter name (layers carry their global index,
so names do not depend on the pipeline split), with ``@tp<r>`` appended for TP-sharded ones; tensors
replicated over DP×SP (and over TP when not sharded) share a key and DCP writes them once; the RNG state
is kept per global rank. Resume needs the same model config; SP and DP may change freely, and a TP or
PP change is resharded on load (reshard.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from longscan.distributed.sync import barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
FORMAT = 2
METADATA_FILE = ".metadata"
RESUME_LAYOUT_KEYS = ("tp", "pp")
"""Parallel sizes a checkpoint's TP shards and pipeline split depend on: a change is resharded on load."""


class CheckpointError(RuntimeError):
    """A checkpoint that must not or cannot be loaded; the message names the file and what is wrong."""


class CheckpointMismatch(CheckpointError):
    """A valid checkpoint written with a different TP/PP layout or model config than this run's."""


# ------------------------------------------------------------------ restricted unpickling -----------------
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "TensorProperties"), (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"), (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),
    ("pathlib._local", "WindowsPath"), ("pathlib._local", "PureWindowsPath"),
})
_DTYPE_NAMES = frozenset(n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype))


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only its own classes (and torch dtypes/Size): a pickle that
    names any other global (os.system, builtins.eval, ...) is refused before anything is called."""

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS or (module == "torch" and name in _DTYPE_NAMES):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.source}: refused to unpickle {module}.{name}: checkpoint metadata may only "
                              "hold torch.distributed.checkpoint metadata classes")


def load_metadata(data: bytes, source: str) -> Metadata:
    """``.metadata`` bytes -> DCP Metadata through :class:`MetadataUnpickler`."""
    try:
        md = MetadataUnpickler(data, source).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or garbage bytes: any unpickling error
        raise CheckpointError(f"{source}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from e
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{source}: holds a {type(md).__name__}, not checkpoint metadata")
    return md


class VerifiedReader(FileSystemReader):
    """DCP's file reader whose metadata read checks the marker's sha256 and unpickles restrictedly."""

    def __init__(self, path: str, sha256: dict[str, str]):
        super().__init__(path)
        self.sha256 = sha256

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        path = os.path.join(str(self.path), name)
        if name not in self.sha256:
            raise CheckpointError(f"{path}: not listed in the checkpoint's {MARKER} marker")
        with open(path, "rb") as f:
            data = f.read()
        got = hashlib.sha256(data).hexdigest()
        if got != self.sha256[name]:  # hashed from the very bytes unpickled below: no window to swap the file
            raise CheckpointError(f"{path}: sha256 {got[:16]}… does not match the {MARKER} marker's "
                                  f"{self.sha256[name][:16]}… (truncated or altered)")
        md = load_metadata(data, path)
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


# ------------------------------------------------------------------ state ----------------------------------
def tp_split_dim(p: torch.Tensor) -> int | None:
    """The dimension ``p`` is split along across TP ranks (megatron's ``partition_dim``), or None when
    every TP rank holds the whole tensor. Saving, resharding (reshard.py) and export all read it here."""
    if not getattr(p, "tensor_model_parallel", False):  # megatron marks its TP-split weights this way
        return None
    return int(p.partition_dim)


def _key(name: str, p: torch.Tensor, tp_rank: int) -> str:
    return name if tp_split_dim(p) is None else f"{name}@tp{tp_rank}"


def training_state(model, optimizer, step: int, tp_rank: int, rank: int, materialize: bool = False) -> dict:
    """Flat dict of tensors to save, or (materialize=True) to load into: missing AdamW state is created
    as zeros so DCP can load in place."""
    state = {"step": torch.tensor(step, dtype=torch.int64)}
    for name, p in model.named_parameters():
        k = _key(name, p, tp_rank)
        state[f"model/{k}"] = p.data
        st = optimizer.state[p]
        if materialize and not st:
            st.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                      exp_avg_sq=torch.zeros_like(p))
        for s in ("step", "exp_avg", "exp_avg_sq"):
            if s in st:
                state[f"optim/{k}/{s}"] = st[s]
    state[f"rng/cpu/rank{rank}"] = torch.random.get_rng_state()
    if torch.cuda.is_available():
        state[f"rng/cuda/rank{rank}"] = torch.cuda.get_rng_state()
    return state


def state_is_finite(state: dict, device: torch.device | str = "cpu") -> bool:
    """True when every floating tensor of ``state`` is finite on every rank (collective). device: where the
    flag is reduced, the process group's device (CUDA under NCCL, which takes no CPU tensors)."""
    finite = [torch.isfinite(v).all().to(device) for v in state.values() if v.is_floating_point()]
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    if finite:   # one host read for the whole state, not one per tensor
        flag += (~torch.stack(finite).all()).to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


# ------------------------------------------------------------------ save -----------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(ckpt_dir: str, step: int, state: dict, keep: int, run_id: str, layout: dict,
         protect: str | None = None) -> str:
    """Collective: write ``state`` for ``step`` and publish it atomically. Returns the final path.

    ``layout`` ({"tp", "pp", "sp", "dp", "model": {...}}) is recorded in the marker and checked on resume;
    ``run_id`` marks the checkpoint as this run's: pruning to ``keep`` deletes only this run's older
    checkpoints and never ``protect``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    dcp.save(state, checkpoint_id=tmp)
    barrier()
    # Each rank hashes the shard files it wrote (DCP names them __<rank>_<i>.distcp): the cost is spread.
    mine = {n: sha256_file(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp)) if n.startswith(f"__{rank}_")}
    hashes: list = [None] * world
    dist.all_gather_object(hashes, mine)
    if rank == 0:
        files = {k: v for h in hashes for k, v in h.items()}
        for n in sorted(os.listdir(tmp)):
            if n not in files:
                files[n] = sha256_file(os.path.join(tmp, n))
        marker = {"format": FORMAT, "step": step, "world_size": world, "run_id": run_id, "layout": layout,
                  "files": files}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(marker, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(ckpt_dir, keep, run_id, protect)
    barrier()
    return final


def prune(ckpt_dir: str, keep: int, run_id: str, protect: str | None = None) -> None:
    """Delete this run's complete checkpoints beyond the newest ``keep`` (never ``protect``; keep=0 keeps
    all) and leftovers of killed saves. Checkpoints of other runs are left alone."""
    own = [p for _, p in complete(ckpt_dir) if _run_id(p) == run_id]
    for path in own[:-keep] if keep > 0 else []:
        if protect is None or os.path.abspath(path) != os.path.abspath(protect):
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(ckpt_dir):  # the directory lock makes every .tmp a killed save's
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def clear(ckpt_dir: str) -> list[str]:
    """Delete every checkpoint directory (complete or not) in ``ckpt_dir``; returns their names."""
    gone = []
    if os.path.isdir(ckpt_dir):
        for name in sorted(os.listdir(ckpt_dir)):
            if name.startswith("step_") and os.path.isdir(os.path.join(ckpt_dir, name)):
                shutil.rmtree(os.path.join(ckpt_dir, name))
                gone.append(name)
    return gone


def _run_id(path: str) -> str | None:
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def complete(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the ``step_<N>`` directories holding a marker, oldest first (not yet verified)."""
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_DIR.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest(ckpt_dir: str) -> str | None:
    """Newest directory with a completion marker, or None (not verified: see :func:`select`)."""
    c = complete(ckpt_dir)
    return c[-1][1] if c else None


# ------------------------------------------------------------------ verify + load --------------------------
def read_marker(path: str) -> dict:
    """The marker of checkpoint ``path``, checked for shape; raises CheckpointError naming the file."""
    mpath = os.path.join(path, MARKER)
    try:
        with open(mpath) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath}: unreadable completion marker ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a format-{FORMAT} completion marker (written by an older longscan, "
                              "without checksums, or altered)")
    files, layout = m.get("files"), m.get("layout")
    if (not isinstance(files, dict) or METADATA_FILE not in files or not isinstance(layout, dict)
            or not isinstance(m.get("step"), int) or not all(isinstance(v, str) for v in files.values())):
        raise CheckpointError(f"{mpath}: completion marker lacks its file checksums, step or layout")
    return m


def verify_files(path: str, sha256: dict[str, str], names: list[str]) -> list[str]:
    """Problems (one line each, naming the file) of ``names`` in checkpoint ``path``; [] when all match."""
    problems = []
    for n in names:
        if os.path.basename(n) != n:
            problems.append(f"{os.path.join(path, MARKER)}: lists a file outside the checkpoint: {n!r}")
            continue
        f = os.path.join(path, n)
        if not os.path.isfile(f):
            problems.append(f"{f}: missing")
            continue
        got = sha256_file(f)
        if got != sha256[n]:
            problems.append(f"{f}: sha256 {got[:16]}… does not match the marker's {sha256[n][:16]}… "
                            "(truncated or altered)")
    return problems


def layout_differences(saved: dict, current: dict) -> list[str]:
    """What differs between a checkpoint's layout and this run's in what a resume depends on."""
    current = json.loads(json.dumps(current))  # as the marker holds it (tuples become lists)
    diffs = [f"parallel.{k}: checkpoint {saved.get(k)}, this run {current[k]}"
             for k in RESUME_LAYOUT_KEYS if saved.get(k) != current[k]]
    sm, cm = saved.get("model") or {}, current["model"]
    diffs += [f"model.{k}: checkpoint {sm.get(k)!r}, this run {cm.get(k)!r}"
              for k in sorted(set(sm) | set(cm)) if sm.get(k) != cm.get(k)]
    return diffs


def select(ckpt_dir: str, layout: dict, reshard: bool = True) -> tuple[str | None, dict | None, list[str]]:
    """Collective: the newest checkpoint whose files all match their checksums -> (path, marker, notes).

    Ranks verify disjoint slices of the files and agree on the result. ``notes`` name every skipped
    candidate and its bad file. Raises CheckpointMismatch when the chosen checkpoint's model config
    differs from ``layout``'s, or (``reshard=False``) its TP/PP sizes do, and CheckpointError when
    candidates exist but none verifies. (None, None, []) when there is nothing to resume from.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    listing = [complete(ckpt_dir) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)  # one view of the directory for every rank
    notes: list[str] = []
    for _, path in reversed(listing[0]):
        try:
            marker = read_marker(path)
            names = sorted(marker["files"])
            mine = verify_files(path, marker["files"], names[rank::world])
        except CheckpointError as e:
            marker, mine = None, [str(e)]
        problems: list = [None] * world
        dist.all_gather_object(problems, mine)
        bad = sorted({p for ps in problems for p in ps})
        if bad:
            notes.append(f"skipping checkpoint {path}: {'; '.join(bad)}")
            continue
        diffs = layout_differences(marker["layout"], layout)
        refused = [d for d in diffs if d.startswith("model.") or not reshard]
        if refused:
            may = ("SP, DP, TP and PP sizes may change on resume; the model config may not" if reshard else
                   "SP and DP sizes may change on resume with this optimizer engine; TP, PP and the model config "
                   "may not")
            raise CheckpointMismatch(f"cannot resume from {path}: it was written with a different layout or model "
                                     f"({'; '.join(refused)}). {may}. Resume with the checkpoint's values, or set "
                                     "checkpoint.resume=false checkpoint.overwrite=true to start over")
        return path, marker, notes
    if notes:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} passed verification: " + " | ".join(notes) +
                              ". Restore the files, or set checkpoint.resume=false checkpoint.overwrite=true to start "
                              "over")
    return None, None, notes


def needs_reshard(marker: dict, layout: dict) -> bool:
    """True when checkpoint ``marker`` was written with other TP or PP sizes than ``layout``'s."""
    return any(marker["layout"].get(k) != layout[k] for k in RESUME_LAYOUT_KEYS)


def load(path: str, state: dict, marker: dict) -> int:
    """Collective: load verified checkpoint ``path`` into ``state`` in place, restore this rank's RNG;
    returns the step. RNG states of ranks the checkpoint did not have (a larger world) stay as they are."""
    reader = VerifiedReader(path, marker["files"])
    saved = reader.read_metadata().state_dict_metadata
    missing = [k for k in state if k not in saved]
    if any(not k.startswith("rng/") for k in missing):
        raise CheckpointMismatch(f"{path}: lacks {len(missing)} tensor(s) this model has, e.g. "
                                 f"{', '.join(sorted(missing)[:3])}")
    state = {k: v for k, v in state.items() if k in saved}
    dcp.load(state, storage_reader=reader)
    for k, v in state.items():
        if k.startswith("rng/cpu/"):
            torch.random.set_rng_state(v)
        elif k.startswith("rng/cuda/"):
            torch.cuda.set_rng_state(v)
    return int(state["step"])
