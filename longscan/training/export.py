"""`longscan export`: a training checkpoint -> one safetensors file, loadable on one process.

A checkpoint holds each TP rank's shard of a sharded parameter under ``<name>@tp<r>`` and each pipeline
stage's layers under their global index (see checkpoint.py). Export reads it without torch.distributed,
concatenates the shards along each parameter's megatron ``partition_dim`` into the full tensor, and writes
the unsplit model's state dict with the model config (JSON) in the safetensors metadata.
:func:`load_exported` builds that unsplit model (tp = pp = sp = 1) and loads the file; it needs no launcher
or rendezvous (megatron's layers need a process group: a one-process group is made in memory).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from longscan.distributed.layouts import positions
from longscan.models import HybridLM, SPSpec
from longscan.models.args import ModelConfig
from longscan.models.rope import rope_cos_sin
from longscan.training import checkpoint as ckpt
from longscan.training.parallel import stage_config

CONFIG_KEY = "longscan_model_config"
STEP_KEY = "longscan_step"


class ExportError(ValueError):
    """A checkpoint or exported file that cannot be read; the message names the path."""


@dataclass(frozen=True)
class ExportOptions:
    """What to export and where."""
    checkpoint: str
    """A complete checkpoint directory (``<dir>/step_N``) or a checkpoint.dir (its newest complete one)."""
    output: str
    """The .safetensors file to write."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ExportError("export needs the `safetensors` package: pip install 'longscan[export]'") from e
    return st


def unsplit_model(model_cfg: ModelConfig, linear_backend: str = "auto", sp_group=None) -> HybridLM:
    """The whole model as one stage on one process. Building it needs no process group; running it needs
    :func:`one_process_groups` and its one-rank ``sp_group``."""
    mp = stage_config(1, 1, 1, model_cfg.dim, torch.float32)
    sp = SPSpec(group=sp_group, layout="contiguous", linear_method="zeco", softmax_method="ring",
                linear_backend=linear_backend, softmax_backend="auto", linear_overlap=False)
    return HybridLM(model_cfg, mp, sp)


def resolve_checkpoint(path: str) -> str:
    """``path`` itself when it is a complete checkpoint, else the newest complete one under it."""
    if os.path.isfile(os.path.join(path, ckpt.MARKER)):
        return path
    newest = ckpt.latest(path)
    if newest is None:
        raise ExportError(f"--checkpoint {path!r} is neither a complete checkpoint (a step_N directory holding "
                          f"{ckpt.MARKER}) nor a directory containing one")
    return newest


def gather_state(path: str, model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], int]:
    """Full (unsharded) parameters of checkpoint ``path`` for ``model_cfg`` -> (state dict, step)."""
    reference = unsplit_model(model_cfg)
    try:  # every file against the marker's checksums before anything is unpickled (docs/reliability.md)
        marker = ckpt.read_marker(path)
        problems = ckpt.verify_files(path, marker["files"], sorted(marker["files"]))
    except ckpt.CheckpointError as e:
        raise ExportError(str(e)) from e
    if problems:
        raise ExportError(f"checkpoint {path!r} failed verification: {'; '.join(problems)}")
    stored = ckpt.VerifiedReader(path, marker["files"]).read_metadata().state_dict_metadata
    state: dict[str, torch.Tensor] = {"step": torch.zeros((), dtype=torch.int64)}
    for key, md in stored.items():
        if key.startswith("model/"):
            state[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    step = ckpt.load(path, state, marker)
    out = {}
    for name, p in reference.named_parameters():
        if f"model/{name}" in state:
            full = state[f"model/{name}"]
        else:
            shards = []
            while f"model/{name}@tp{len(shards)}" in state:
                shards.append(state[f"model/{name}@tp{len(shards)}"])
            if not shards:
                raise ExportError(f"checkpoint {path!r} has no parameter {name!r}: it was not trained with this "
                                  "model config (pass the training run's --config and model.* overrides)")
            dim = ckpt.tp_split_dim(p)
            if dim is None:
                raise ExportError(f"checkpoint {path!r} holds TP shards of {name!r}, which this model config "
                                  "does not split (pass the training run's --config and model.* overrides)")
            full = torch.cat(shards, dim=dim)
        if full.shape != p.shape:
            raise ExportError(f"checkpoint {path!r}: parameter {name!r} has shape {tuple(full.shape)}, the config "
                              f"gives {tuple(p.shape)} (pass the training run's --config and model.* overrides)")
        out[name] = full.contiguous()
    return out, step


def export(opts: ExportOptions, model_cfg: ModelConfig) -> dict:
    """Write ``opts.output``; returns {"checkpoint", "step", "parameters", "numel"}."""
    st = _safetensors()
    path = resolve_checkpoint(opts.checkpoint)
    tensors, step = gather_state(path, model_cfg)
    if os.path.isdir(opts.output):
        raise ExportError(f"--output {opts.output!r} is a directory; give a file name such as model.safetensors")
    d = os.path.dirname(os.path.abspath(opts.output))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".export-", suffix=".safetensors")
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata={CONFIG_KEY: json.dumps(dataclasses.asdict(model_cfg)),
                                             STEP_KEY: str(step)})
        os.replace(tmp, opts.output)
    except BaseException:
        os.unlink(tmp)
        raise
    return {"checkpoint": path, "step": step, "parameters": len(tensors),
            "numel": sum(t.numel() for t in tensors.values())}


def one_process_groups() -> None:
    """Megatron's layers read their TP group even at TP = 1: start a one-process gloo group on an
    in-memory store (no network, no environment variables) and TP = PP = 1 groups, unless they exist."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(create_gloo_process_groups=False)
    elif max(parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_context_parallel_world_size()) > 1:
        raise ExportError("load_exported builds the whole model on one process, but this process already belongs "
                          "to TP / SP (context-parallel) groups of more than one rank")


def load_exported(path: str, device: str | torch.device = "cpu", linear_backend: str = "auto") -> HybridLM:
    """Build the unsplit model from an exported file's config and load its weights (eval mode)."""
    st = _safetensors()
    if not os.path.isfile(path):
        raise ExportError(f"exported model {path!r} does not exist")
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ExportError(f"{path!r} has no {CONFIG_KEY!r} metadata: it was not written by `longscan export`")
    model_cfg = ModelConfig(**json.loads(meta[CONFIG_KEY]))
    one_process_groups()
    # an explicit one-rank SP group: None would mean the default group, all ranks of a launched job
    model = unsplit_model(model_cfg, linear_backend, sp_group=parallel_state.get_context_parallel_group())
    model.load_state_dict(st.load_file(path), strict=True)
    return model.to(device).eval()


def logits(model: HybridLM, tokens: torch.Tensor) -> torch.Tensor:
    """Logits `[B, T, V_local]` of a model that holds every layer (pp = 1): this TP rank's vocabulary
    columns (all of them on one process). ``tokens`` `[B, T]` are the local (SP) tokens."""
    if not (model.first and model.last):
        raise ValueError("logits() needs the whole model in one stage (pp = 1)")
    x = model.embed(tokens)
    pos = positions(x.shape[1], model.sp.group, model.sp.layout, device=x.device)
    cos, sin = rope_cos_sin(pos, model.cfg.hd, model.cfg.rope_theta)
    for layer in model.layers.values():
        x = layer(x, cos, sin)
    return model.output(model.norm(x))[0]


def cmd_export(argv: list[str]) -> int:
    from longscan.training.config import ConfigError, load_config
    p = argparse.ArgumentParser(prog="longscan export",
                                description="Write a checkpoint's model as one safetensors file (TP/PP shards "
                                            "gathered), loadable with longscan.training.export.load_exported.")
    p.add_argument("--checkpoint", required=True, help="CKPT_DIR/step_N (or CKPT_DIR: its newest complete one)")
    p.add_argument("--output", required=True, help="file to write, e.g. model.safetensors")
    p.add_argument("--config", default=None, help="the training run's YAML config (default: the embedded one)")
    p.add_argument("overrides", nargs="*", help="the training run's model.* overrides (section.key=value)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        info = export(ExportOptions(checkpoint=a.checkpoint, output=a.output), cfg.model)
    except (ConfigError, ExportError) as e:
        print(f"longscan export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}: {info['parameters']} tensors, {info['numel']:,} parameters from {info['checkpoint']} "
          f"(step {info['step']})")
    return 0
