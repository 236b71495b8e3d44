"""Training configuration: YAML sections mapped onto dataclasses, ``key=value`` overrides, validation.

A config file has the sections model, parallel, data, optimizer, schedule, checkpoint, logging; any
missing section or key keeps its default. Unknown sections/keys are errors that name the allowed ones.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

from longscan.models.args import LINEAR_VARIANTS, ModelConfig

LINEAR_METHODS = ("zeco", "lasp2", "lasp1")
SOFTMAX_METHODS = ("ring", "allgather", "ulysses")
LAYOUTS = ("contiguous", "zigzag")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


@dataclass
class ParallelConfig:
    """How the world is split: world size = tp · pp · sp · dp (megatron order tp-cp-dp-pp)."""
    tp: int = 1
    """Tensor parallel size (attention heads, MLP hidden units and vocabulary split)."""
    pp: int = 1
    """Pipeline parallel size (layers split into stages, 1F1B over microbatches)."""
    sp: int = 1
    """Sequence parallel size = megatron's context-parallel group; each rank holds seq_len/sp tokens."""
    dp: int = 0
    """Data parallel size; 0 = whatever the world size leaves (world / (tp·pp·sp))."""
    layout: str = "zigzag"
    """Sequence layout for the whole model: contiguous | zigzag."""
    linear_method: str = "zeco"
    """SP method of linear-attention layers: zeco | lasp2 | lasp1."""
    softmax_method: str = "ring"
    """SP method of softmax-attention layers: ring | allgather | ulysses."""
    linear_backend: str = "auto"
    """Local linear-attention kernel: auto | torch | triton | naive."""
    linear_overlap: bool = False
    """Linear SP forward on CUDA: false: the output pass waits for the collective and starts from the prefix;
    true: the collective runs beside the local output pass, then a correction pass over q and o (it cost more
    GPU time than a 100 µs collective hides: benchmarks/RESULTS.md)."""
    softmax_backend: str = "auto"
    """Local softmax-attention kernel (passed to the SP operator)."""
    timeout_s: float = 0.0
    """Collective timeout in seconds: a rank waiting longer on a stopped or dead peer fails with an error naming
    itself and the collective (exit code 4). 0 = 300 on CPU (gloo), 1800 on GPU (NCCL)."""


@dataclass
class DataConfig:
    """Where tokens come from and how they are batched."""
    source: str = "stdlib"
    """stdlib (byte-level Python standard library, no download) | tokens (a prepared token file)."""
    path: str = ""
    """Token file written by `longscan prepare-data` (source=tokens)."""
    seq_len: int = 256
    """Global sequence length (tokens per sequence, split over the SP group)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all DP ranks."""
    micro_batch_size: int = 1
    """Sequences per microbatch on one DP rank; microbatches = global / (micro · dp)."""
    val_fraction: float = 0.02
    """Fraction of the packed sequences (the last ones) held out for validation."""
    cache_dir: str = "~/.cache/longscan"
    """Where the stdlib corpus is tokenised once."""
    seed: int = 1234
    """Seed of the training-order shuffle."""


@dataclass
class OptimizerConfig:
    """AdamW and the gradient clip."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to 2-D weights only."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    engine: str = "torch"
    """torch (AdamW on every rank) | deepspeed (DeepSpeed ZeRO optimizer over the DP group)."""
    zero_stage: int = 1
    """ZeRO stage when engine=deepspeed; only 1 (optimizer states partitioned) works under megatron's schedules."""


@dataclass
class ScheduleConfig:
    """Step counts, warmup + cosine, validation cadence, precision, seeds."""
    steps: int = 120
    """Optimizer steps."""
    warmup_steps: int = 10
    """Linear warmup steps, then cosine to min_lr_ratio · lr at `steps`."""
    val_every: int = 40
    """Validate every this many steps (and at the end); 0 = only at the end."""
    val_batches: int = 2
    """Global batches per validation."""
    seed: int = 0
    """Model init seed (identical on every rank)."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, float32 on CPU) | bf16 | fp32."""
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of keeping its activations."""
    max_skipped_steps: int = 10
    """A step with a non-finite loss or gradient norm is skipped (no update); after this many consecutive
    skipped steps the run stops with exit code 3."""


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint snapshots, written to `<dir>/step_N.tmp` and renamed when complete."""
    dir: str = ""
    """Checkpoint directory ('' = no checkpoints)."""
    every: int = 0
    """Save every this many steps (0 = only at the end when dir is set)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in dir, if any."""
    keep: int = 2
    """Complete checkpoints of this run kept (its older ones deleted; 0 = keep all)."""
    overwrite: bool = False
    """With resume=false, delete the checkpoints already in dir instead of refusing to start."""
    on_signal: bool = False
    """On SIGTERM/SIGINT save a checkpoint before stopping (SIGUSR1 always saves when dir is set)."""


@dataclass
class LoggingConfig:
    """Progress bar, JSON-lines metrics and TensorBoard."""
    dir: str = ""
    """Run directory for metrics.jsonl and TensorBoard events ('' = none)."""
    log_every: int = 5
    """Print a progress line every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed and dir is set."""
    stop_after: int = 0
    """Stop (as if killed) after this step; 0 = run to `schedule.steps`. For resume tests/debugging."""


@dataclass
class TrainConfig:
    """Everything `longscan train` needs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _from_dict(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r}; allowed: {', '.join(sorted(fields))}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _from_dict(sub, value or {}, name)
        else:
            default = getattr(cls(), key)
            kwargs[key] = _coerce(value, default, name)
    return cls(**kwargs)


def _coerce(value, default, name):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        return "" if value is None else str(value)
    return value


def parse_overrides(items: list[str]) -> dict:
    """["model.dim=64", "parallel.sp=2"] -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key (e.g. parallel.sp=2)")
        out.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def default_config_text() -> str:
    """The embedded default config shipped inside the package (longscan/configs/default.yaml)."""
    return resources.files("longscan").joinpath("configs/default.yaml").read_text()


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Load YAML (the embedded default when path is None), apply overrides, return a TrainConfig.

    Structural errors (unknown keys, wrong types) raise ConfigError here; runtime checks that need the
    world size are in :func:`validate`.
    """
    if path is None:
        raw = yaml.safe_load(default_config_text()) or {}
    else:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    over = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    return _from_dict(TrainConfig, _merge(raw, over), "")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not allowed; choose one of {', '.join(allowed)}")


def validate(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Check the config against the world size; fills parallel.dp when 0. Raises ConfigError."""
    m, p, d, s = cfg.model, cfg.parallel, cfg.data, cfg.schedule
    _choice("model.linear_variant", m.linear_variant, LINEAR_VARIANTS)
    _choice("parallel.layout", p.layout, LAYOUTS)
    _choice("parallel.linear_method", p.linear_method, LINEAR_METHODS)
    _choice("parallel.softmax_method", p.softmax_method, SOFTMAX_METHODS)
    _choice("data.source", d.source, ("stdlib", "tokens"))
    _choice("optimizer.engine", cfg.optimizer.engine, ("torch", "deepspeed"))
    _choice("schedule.precision", s.precision, ("auto", "bf16", "fp32"))
    if cfg.optimizer.engine == "deepspeed":
        if cfg.optimizer.zero_stage != 1:
            raise ConfigError(f"optimizer.zero_stage = {cfg.optimizer.zero_stage} is not allowed; choose 1 (ZeRO-2 "
                              "reduces from DeepSpeed's own backward, which megatron's schedules bypass)")
        if cfg.checkpoint.dir:
            raise ConfigError("checkpoint.dir is not supported with optimizer.engine = deepspeed yet (its partitioned "
                              "optimizer state is not in the DCP checkpoint); use engine=torch to checkpoint")
    if not m.pattern or set(m.pattern) - {"L", "N"}:
        raise ConfigError(f"model.pattern = {m.pattern!r} must be a non-empty string of L (linear) and N (softmax)")
    for name in ("tp", "pp", "sp"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    mp = p.tp * p.pp * p.sp
    if p.dp == 0:
        if world_size % mp:
            raise ConfigError(f"world size {world_size} is not divisible by tp·pp·sp = {p.tp}·{p.pp}·{p.sp} = {mp}")
        p.dp = world_size // mp
    if p.tp * p.pp * p.sp * p.dp != world_size:
        raise ConfigError(f"world size {world_size} != tp·pp·sp·dp = {p.tp}·{p.pp}·{p.sp}·{p.dp} = "
                          f"{p.tp * p.pp * p.sp * p.dp}")
    if m.dim % m.n_heads and not m.head_dim:
        raise ConfigError(f"model.dim = {m.dim} is not divisible by model.n_heads = {m.n_heads}; set model.head_dim")
    if m.n_heads % p.tp:
        raise ConfigError(f"model.n_heads = {m.n_heads} is not divisible by parallel.tp = {p.tp}")
    if "N" in m.pattern:
        if m.n_kv_heads % p.tp:
            raise ConfigError(f"model.n_kv_heads = {m.n_kv_heads} is not divisible by parallel.tp = {p.tp}")
        if m.n_heads % m.n_kv_heads:
            raise ConfigError(f"model.n_heads = {m.n_heads} is not divisible by model.n_kv_heads = {m.n_kv_heads}")
        if p.softmax_method == "ulysses" and ((m.n_heads // p.tp) % p.sp or (m.n_kv_heads // p.tp) % p.sp):
            raise ConfigError(f"softmax_method=ulysses needs the heads per TP rank ({m.n_heads // p.tp} query, "
                              f"{m.n_kv_heads // p.tp} kv) divisible by parallel.sp = {p.sp}")
    if m.hd % 2:
        raise ConfigError(f"head dim {m.hd} must be even (RoPE)")
    if m.padded_vocab % p.tp:
        raise ConfigError(f"padded vocabulary {m.padded_vocab} is not divisible by parallel.tp = {p.tp}; "
                          "change model.pad_vocab_to")
    if m.n_layers % p.pp:
        raise ConfigError(f"model.n_layers = {m.n_layers} is not divisible by parallel.pp = {p.pp}")
    pieces = p.sp * (2 if p.layout == "zigzag" else 1)
    if d.seq_len % pieces:
        raise ConfigError(f"data.seq_len = {d.seq_len} must divide into {pieces} pieces for layout={p.layout!r} "
                          f"over parallel.sp = {p.sp} (local length seq_len/sp"
                          f"{' must be even' if p.layout == 'zigzag' else ''})")
    if d.global_batch_size % (d.micro_batch_size * p.dp):
        raise ConfigError(f"data.global_batch_size = {d.global_batch_size} is not divisible by "
                          f"data.micro_batch_size · dp = {d.micro_batch_size}·{p.dp}")
    if d.source == "tokens" and not d.path:
        raise ConfigError("data.source = tokens needs data.path (a file written by `longscan prepare-data`)")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction = {d.val_fraction} must be in (0, 1)")
    if s.steps < 1 or s.warmup_steps < 0:
        raise ConfigError("schedule.steps must be >= 1 and schedule.warmup_steps >= 0")
    return cfg
