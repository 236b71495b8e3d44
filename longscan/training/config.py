"""Training configuration: YAML sections mapped onto dataclasses, ``key=value`` overrides, validation.

A config file has the sections model, parallel, data, optimizer, schedule, checkpoint, logging, memory,
kernels; any
missing section or key keeps its default. Unknown sections/keys are errors that name the allowed ones.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

from longscan.distributed.layouts import LAYOUTS
from longscan.kernels.delta_rule import BACKENDS as DELTA_BACKENDS
from longscan.kernels.delta_rule import TRITON_PATHS as DELTA_PATHS
from longscan.kernels.linear_attention import BACKENDS as LINEAR_BACKENDS
from longscan.kernels.linear_attention import RESET_BACKENDS
from longscan.kernels.linear_attention.options import LinearKernelOptions
from longscan.kernels.softmax_attention import BACKENDS as SOFTMAX_BACKENDS
from longscan.models.args import DELTA_VARIANTS, PINNED_MODES, STAGE_MODES, MemoryOptions, ModelConfig
from longscan.parallel.delta_rule import TRANSITIONS as DELTA_TRANSITIONS
from longscan.parallel.linear.common import METHODS as LINEAR_METHODS
from longscan.parallel.softmax import METHODS as SOFTMAX_METHODS
from longscan.training.data import BYTE_VOCAB


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is allowed."""


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _at_least(section, obj, minimum: int, *names):
    for name in names:
        if getattr(obj, name) < minimum:
            raise ConfigError(f"{section}.{name} must be >= {minimum}, got {getattr(obj, name)}")


def _finite(section, obj, name, low, high=math.inf, low_open=False, high_open=True):
    """A float key in [low, high) (``low_open``/``high_open``: that end excluded); nan and inf fail."""
    value = getattr(obj, name)
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    if not ok:
        rng = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{section}.{name} must be a finite number in {rng}, got {value}")


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
    GPU time than a 100 µs collective hides: docs/benchmarks.md)."""
    softmax_backend: str = "auto"
    """Local softmax-attention kernel (passed to the SP operator)."""
    delta_transition: str = "matrix"
    """How ZeCO applies a rank's segment to the carry in the delta-rule variants (model.linear_variant = deltanet
    | gated_deltanet | kda): matrix (its K×K transition, formed beside the outputs: about twice the plain
    kernel's work, whatever the SP size) | relay (the rank's own state pass from the carry, block by block of V
    columns along the chain: the plain kernel's work, a chain latency growing with the SP size). zeco only."""
    timeout_s: float = 0.0
    """Collective timeout in seconds: a rank waiting longer on a stopped or dead peer fails with an error naming
    itself and the collective (exit code 4). 0 = 300 on CPU (gloo), 1800 on GPU (NCCL)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """This section's own checks (ConfigError naming the key); cross-section ones are in :func:`validate`."""
        _at_least("parallel", self, 1, "tp", "pp", "sp")
        _at_least("parallel", self, 0, "dp")
        _choice("parallel.layout", self.layout, LAYOUTS)
        _choice("parallel.linear_method", self.linear_method, LINEAR_METHODS)
        _choice("parallel.softmax_method", self.softmax_method, SOFTMAX_METHODS)
        _choice("parallel.linear_backend", self.linear_backend, LINEAR_BACKENDS)
        _choice("parallel.softmax_backend", self.softmax_backend, SOFTMAX_BACKENDS)
        _choice("parallel.delta_transition", self.delta_transition, DELTA_TRANSITIONS)
        if self.delta_transition != "matrix" and self.linear_method != "zeco":
            raise ConfigError(f"parallel.delta_transition = {self.delta_transition!r} applies to "
                              f"parallel.linear_method = 'zeco' only, got {self.linear_method!r}")


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
    pack_documents: bool = False
    """Attend within documents only: split sequences after each EOS, restart RoPE positions per document and
    drop the EOS token's target. Linear layers (L) need parallel.linear_backend auto, torch, naive or triton
    and a linear_variant without the delta rule."""
    balance_documents: bool = False
    """With pack_documents and parallel.sp > 1: reorder each sequence's documents so that causal softmax
    attention's (query, key) pairs spread evenly over the SP ranks (the same loss and gradients)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """This section's own checks (ConfigError naming the key); cross-section ones are in :func:`validate`."""
        _choice("data.source", self.source, ("stdlib", "tokens"))
        _at_least("data", self, 1, "seq_len", "global_batch_size", "micro_batch_size")
        _at_least("data", self, 0, "seed")   # numpy's generators take no negative seed
        _finite("data", self, "val_fraction", 0, 1, low_open=True)
        if self.source == "tokens" and not self.path:
            raise ConfigError("data.source = tokens needs data.path (a file written by `longscan prepare-data`)")
        if self.balance_documents and not self.pack_documents:
            raise ConfigError("data.balance_documents = true reorders packed documents and needs "
                              "data.pack_documents = true")


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
    overlap_grad_reduce: bool = True
    """engine=torch: reduce each gradient over DP × SP as soon as the backward has finished it, beside the rest of
    the backward; false: one all-reduce of every gradient after the backward. The same sums either way."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """This section's own checks (ConfigError naming the key); cross-section ones are in :func:`validate`."""
        _finite("optimizer", self, "lr", 0, low_open=True)
        _finite("optimizer", self, "min_lr_ratio", 0, 1, high_open=False)
        _finite("optimizer", self, "weight_decay", 0)
        _finite("optimizer", self, "beta1", 0, 1)
        _finite("optimizer", self, "beta2", 0, 1)
        _finite("optimizer", self, "eps", 0, low_open=True)
        _finite("optimizer", self, "grad_clip", 0)
        _choice("optimizer.engine", self.engine, ("torch", "deepspeed"))
        if self.engine == "deepspeed" and self.zero_stage != 1:
            raise ConfigError(f"optimizer.zero_stage = {self.zero_stage} is not allowed; choose 1 (ZeRO-2 "
                              "reduces from DeepSpeed's own backward, which megatron's schedules bypass)")


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
    """Recompute each block in backward instead of keeping its activations (the same as memory.blocks =
    checkpoint)."""
    max_skipped_steps: int = 10
    """A step with a non-finite loss or gradient norm is skipped (no update); after this many consecutive
    skipped steps the run stops with exit code 3."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """This section's own checks (ConfigError naming the key); cross-section ones are in :func:`validate`."""
        _at_least("schedule", self, 1, "steps", "val_batches")
        _at_least("schedule", self, 0, "warmup_steps", "val_every")
        _choice("schedule.precision", self.precision, ("auto", "bf16", "fp32"))


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

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """This section's own checks (ConfigError naming the key); cross-section ones are in :func:`validate`."""
        _at_least("checkpoint", self, 0, "every")
        _at_least("checkpoint", self, 1, "keep")


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
    wandb_project: str = ""
    """Also log to this Weights & Biases project ('' = off; needs `pip install 'longscan[wandb]'`)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """This section's own checks (ConfigError naming the key); cross-section ones are in :func:`validate`."""
        _at_least("logging", self, 1, "log_every")
        _at_least("logging", self, 0, "stop_after")


@dataclass
class MemoryConfig:
    """What the model keeps for its backward and how long sequences are cut; every choice computes the same
    result (see docs/memory.md)."""
    linear_layers: str = "none"
    """Linear-attention blocks' mixer stage (norm + attention): none (keep activations) | checkpoint (keep
    its input, recompute in the backward) | offload (checkpoint, the input waiting in pinned host memory)."""
    softmax_layers: str = "none"
    """Softmax-attention blocks' mixer stage: none | checkpoint | offload."""
    mlp: str = "none"
    """Every block's MLP stage (norm + SwiGLU): none | checkpoint | offload."""
    mlp_tile: int = 0
    """Tokens per tile of the sequence-tiled MLP (the `[T, ffn]` intermediates live for one tile, recomputed
    in the backward); 0 = untiled."""
    loss_chunk: int = 0
    """Tokens per chunk of the cross entropy computed from the hidden states (the `[T, vocab]` float32 logits
    are never held at once); 0 = the whole logits."""
    mixer_tile: int = 0
    """Tokens per tile of the mixers' token-wise parts: the norm, the q/k/v/gate projections (RoPE included),
    the output norm and projection run one tile at a time, recomputed per tile in the backward; only the
    attention's inputs and output are held for the whole sequence. 0 = untiled. Not for the delta-rule
    variants (their short convolution mixes neighbouring tokens)."""
    mixer_head_groups: int = 0
    """Mixers run their heads (those of one TP rank) in this many groups: one group's q, k, v, output and their
    gradients alive at a time, each group recomputed in the backward; softmax mixers group their KV heads, each
    with its query heads. 0 or 1 = all heads at once; else a divisor of model.n_heads / parallel.tp (linear
    layers) and of model.n_kv_heads / parallel.tp (softmax layers). Not for the delta-rule variants."""
    blocks: str = "none"
    """Whole blocks: none (linear_layers / softmax_layers / mlp decide per stage) | checkpoint (keep each block's
    input on the GPU, recompute the whole block in the backward; as schedule.activation_checkpointing) | offload
    (the same, each block's input waiting in pinned host memory: one input a block instead of one a stage).
    Not 'none' only with the three per-stage modes at none."""
    recompute_blocks: int = -1
    """How many blocks of each pipeline stage follow linear_layers / softmax_layers / mlp / blocks (and
    schedule.activation_checkpointing): the first ones of the stage, whose activations are held the longest. The
    others keep their activations (mode none) and skip the recomputation: spare GPU memory bought back as
    speed. -1 = every block; else 0 .. model.n_layers / parallel.pp."""
    check_capacity: bool = True
    """Refuse to start when the predicted peak memory per GPU (longscan.training.memory) exceeds the device's
    memory, or on CPU when the node's processes' predicted peaks together exceed the host's memory; false: try
    anyway."""
    pinned: str = "torch"
    """Where offloaded inputs wait on the host (CUDA): torch (torch's caching pinned allocator, which rounds each
    block up to a power of two: a 5 GiB input takes 8) | exact (exactly-sized buffers page-locked with
    cudaHostRegister once, kept in a pool by size and reused from step to step). The estimator, the capacity
    check and `longscan plan` count the bytes of the one chosen. The default stays torch until exact's
    step time is measured beside torch's on a GPU (past 1,048,576 tokens of the 1B config, exact is the one
    that fits a 128 GiB host: docs/memory.md)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """This section's own checks (ConfigError naming the key)."""
        for name in ("blocks", "linear_layers", "softmax_layers", "mlp"):
            _choice(f"memory.{name}", getattr(self, name), STAGE_MODES)
        _choice("memory.pinned", self.pinned, PINNED_MODES)
        stages = (self.linear_layers, self.softmax_layers, self.mlp)
        if self.blocks != "none" and stages != ("none",) * 3:
            raise ConfigError(f"memory.blocks = {self.blocks!r} recomputes whole blocks; set memory.linear_layers / "
                              "softmax_layers / mlp to none (got "
                              f"{' / '.join(stages)}) or memory.blocks to none")
        _at_least("memory", self, 0, "mlp_tile", "loss_chunk", "mixer_tile")
        if self.recompute_blocks < -1:
            raise ConfigError(f"memory.recompute_blocks must be -1 (every block follows the modes) or a count of "
                              f"blocks >= 0, got {self.recompute_blocks}")
        if self.mixer_head_groups < 0:
            raise ConfigError(f"memory.mixer_head_groups must be >= 0 (0 or 1 = off; else a divisor of the heads "
                              f"per TP rank), got {self.mixer_head_groups}")

    def options(self) -> MemoryOptions:
        """The frozen options object the model reads."""
        return MemoryOptions(linear_layers=self.linear_layers, softmax_layers=self.softmax_layers, mlp=self.mlp,
                             mlp_tile=self.mlp_tile, loss_chunk=self.loss_chunk, mixer_tile=self.mixer_tile,
                             mixer_head_groups=self.mixer_head_groups, blocks=self.blocks,
                             recompute_blocks=self.recompute_blocks, pinned=self.pinned)


@dataclass
class KernelsConfig:
    """How the Triton linear-attention kernels cut their work and what they keep for the backward (never what
    they compute; other backends ignore it), and the delta-rule variants' kernel path (delta_path, the one key
    they read). See docs/linear_kernels.md."""
    keep_gate_operands: bool = True
    """Per-key gates (model.linear_variant = gla): the forward keeps its decayed operands and the backward's
    factors (four tensors the size of q per layer) so the backward runs no pre-pass of its own; false: give
    that memory back and recompute them in the backward."""
    chunk: int = 64
    """Tokens a chunk without decay or with a scalar decay (a power of two >= 16)."""
    chunk_per_key: int = 64
    """Tokens a chunk with per-key gates (a power of two >= 16)."""
    segments: int = 0
    """Force the number of sequence segments each sequence is cut into; 0 = the segment plan below decides."""
    split_below: int = 2
    """Cut sequences into segments only when there are fewer than this many programs per SM."""
    programs_per_sm: int = 4
    """Cut into as many segments as keep at most this many programs per SM."""
    min_segment_chunks: int = 8
    """No segment shorter than this many chunks."""
    num_sms: int = 0
    """The SM count the segment plan assumes; 0 = the device's."""
    gate_grad_f32_state: bool = True
    """State products of a gate-gradient backward in float32 precision (bf16 states miss its tolerance)."""
    delta_path: str = "auto"
    """The delta-rule variants' Triton kernels (where the Triton backend runs them): auto (wy for bf16
    activations, float32 otherwise) | float32 (float32 products) | wy (tensor-core products on the inputs'
    dtype, chunks of 64: docs/delta_rule.md)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """This section's own checks (ConfigError naming the key)."""
        _choice("kernels.delta_path", self.delta_path, DELTA_PATHS)
        _at_least("kernels", self, 16, "chunk", "chunk_per_key")
        _at_least("kernels", self, 1, "split_below", "programs_per_sm", "min_segment_chunks")
        _at_least("kernels", self, 0, "segments", "num_sms")
        self.options()

    def options(self) -> LinearKernelOptions:
        """The frozen options object every linear-attention layer passes to its kernels."""
        try:
            return LinearKernelOptions(
                chunk=self.chunk, chunk_per_key=self.chunk_per_key, segments=self.segments or None,
                split_below=self.split_below, programs_per_sm=self.programs_per_sm,
                min_segment_chunks=self.min_segment_chunks, num_sms=self.num_sms or None,
                keep_gate_operands=self.keep_gate_operands, gate_grad_f32_state=self.gate_grad_f32_state)
        except (TypeError, ValueError) as e:   # its messages name LinearKernelOptions.<key>, the same keys
            raise ConfigError(str(e).replace("LinearKernelOptions.", "kernels.")) from None


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
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate_sections(self) -> None:
        """Every section's own checks, again (a section may have been changed since it was built)."""
        try:
            self.model.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for section in (self.parallel, self.data, self.optimizer, self.schedule, self.checkpoint, self.logging,
                        self.kernels):
            section.validate()


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
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a section defined outside this module (ModelConfig) names its key itself
        raise ConfigError(str(e)) from None


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
        if value is None:  # `key:` with no value in YAML
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r} (quote it)")
        return value
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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as 'line L, column C: problem' (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


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
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: malformed YAML at {_yaml_problem(e)}") from None
    over = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    return _from_dict(TrainConfig, _merge(raw, over), "")


def data_vocab_size(d: DataConfig) -> int | None:
    """The vocabulary the data needs: the byte-level corpus's, or the token file's (from its metadata, when it
    is there: a missing file is reported when the data is opened)."""
    if d.source == "stdlib":
        return BYTE_VOCAB
    meta = os.path.expanduser(d.path) + ".json"
    if not os.path.isfile(meta):
        return None
    try:
        with open(meta) as f:
            return int(json.load(f)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"data.path {d.path!r}: its metadata {meta!r} cannot be read ({e}); rebuild it with "
                          "`longscan prepare-data`") from None


def validate(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Every section's checks, then those across sections and against the world size (and the data's
    vocabulary); fills parallel.dp when 0 (its documented meaning). Raises ConfigError naming the key."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive int, got {world_size!r}")
    cfg.validate_sections()
    m, p, d = cfg.model, cfg.parallel, cfg.data
    if cfg.optimizer.engine == "deepspeed" and cfg.checkpoint.dir:
        raise ConfigError("checkpoint.dir is not supported with optimizer.engine = deepspeed yet (its partitioned "
                          "optimizer state is not in the DCP checkpoint); use engine=torch to checkpoint")
    mp = p.tp * p.pp * p.sp
    if p.dp == 0:
        if world_size % mp:
            raise ConfigError(f"world size {world_size} is not divisible by tp·pp·sp = {p.tp}·{p.pp}·{p.sp} = {mp}")
        p.dp = world_size // mp
    if p.tp * p.pp * p.sp * p.dp != world_size:
        raise ConfigError(f"world size {world_size} != tp·pp·sp·dp = {p.tp}·{p.pp}·{p.sp}·{p.dp} = "
                          f"{p.tp * p.pp * p.sp * p.dp}")
    if m.n_heads % p.tp:
        raise ConfigError(f"model.n_heads = {m.n_heads} is not divisible by parallel.tp = {p.tp}")
    if "N" in m.pattern:
        if m.n_kv_heads % p.tp:
            raise ConfigError(f"model.n_kv_heads = {m.n_kv_heads} is not divisible by parallel.tp = {p.tp}")
        if p.softmax_method == "ulysses" and ((m.n_heads // p.tp) % p.sp or (m.n_kv_heads // p.tp) % p.sp):
            raise ConfigError(f"softmax_method=ulysses needs the heads per TP rank ({m.n_heads // p.tp} query, "
                              f"{m.n_kv_heads // p.tp} kv) divisible by parallel.sp = {p.sp}")
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
    vocab = data_vocab_size(d)
    if vocab is not None and vocab > m.vocab_size:
        raise ConfigError(f"model.vocab_size = {m.vocab_size} is smaller than the data's vocabulary ({vocab}); "
                          f"set model.vocab_size={vocab}")
    mem = cfg.memory
    if cfg.schedule.activation_checkpointing and (mem.linear_layers, mem.softmax_layers, mem.mlp) != ("none",) * 3:
        raise ConfigError("schedule.activation_checkpointing checkpoints whole blocks; set it to false to use "
                          "memory.linear_layers / memory.softmax_layers / memory.mlp")
    if cfg.schedule.activation_checkpointing and mem.blocks == "offload":
        raise ConfigError("schedule.activation_checkpointing = true keeps each block's input on the GPU, "
                          "memory.blocks = 'offload' in host memory; set schedule.activation_checkpointing to false "
                          "(memory.blocks alone decides)")
    if mem.recompute_blocks > m.n_layers // p.pp:
        raise ConfigError(f"memory.recompute_blocks = {mem.recompute_blocks} exceeds the blocks of a pipeline stage "
                          f"(model.n_layers / parallel.pp = {m.n_layers}/{p.pp} = {m.n_layers // p.pp}); use at most "
                          "that, or -1 for every block")
    if m.residual_dtype == "bfloat16" and cfg.schedule.precision == "fp32":
        raise ConfigError("model.residual_dtype = 'bfloat16' needs bf16 autocast: schedule.precision = 'fp32' "
                          "runs the blocks in float32 (set schedule.precision to bf16, or auto on a GPU)")
    if "L" in m.pattern and m.linear_variant in DELTA_VARIANTS and p.linear_backend not in DELTA_BACKENDS:
        raise ConfigError(f"model.linear_variant = {m.linear_variant!r} runs the delta-rule kernels, whose backends "
                          f"are {', '.join(DELTA_BACKENDS)}; parallel.linear_backend = {p.linear_backend!r} is not "
                          "one of them")
    if mem.mixer_tile and "L" in m.pattern and m.linear_variant in DELTA_VARIANTS:
        raise ConfigError(f"memory.mixer_tile = {mem.mixer_tile} needs a token-wise mixer; model.linear_variant = "
                          f"{m.linear_variant!r} has a short convolution over neighbouring tokens (set it to 0)")
    groups = mem.mixer_head_groups
    if groups > 1 and "L" in m.pattern:
        if m.linear_variant in DELTA_VARIANTS:
            raise ConfigError(f"memory.mixer_head_groups = {groups} is not supported by model.linear_variant = "
                              f"{m.linear_variant!r} (its short convolution is not cut by heads); set it to 0")
        if (m.n_heads // p.tp) % groups:
            raise ConfigError(f"memory.mixer_head_groups = {groups} must divide the heads per TP rank "
                              f"(model.n_heads / parallel.tp = {m.n_heads}/{p.tp} = {m.n_heads // p.tp}); "
                              "0 or 1 turns it off")
        if d.pack_documents:
            raise ConfigError(f"memory.mixer_head_groups = {groups} does not take packed documents yet; set "
                              "data.pack_documents = false or memory.mixer_head_groups = 0")
    if groups > 1 and "N" in m.pattern:
        kv = m.n_kv_heads // p.tp
        if kv % groups:
            raise ConfigError(f"memory.mixer_head_groups = {groups} must divide the KV heads per TP rank of the "
                              f"softmax layers (model.n_kv_heads / parallel.tp = {m.n_kv_heads}/{p.tp} = {kv}); "
                              "0 or 1 turns it off")
        if p.softmax_method == "ulysses" and (kv // groups) % p.sp:
            raise ConfigError(f"memory.mixer_head_groups = {groups} leaves {kv // groups} KV heads a group, which "
                              f"parallel.softmax_method = 'ulysses' cannot shard over parallel.sp = {p.sp} (heads "
                              "must divide by the SP size); use fewer groups or ring / allgather")
    if d.pack_documents and "L" in m.pattern:
        _check_packed_linear(m, p)
    if d.balance_documents and p.sp < 2:
        raise ConfigError(f"data.balance_documents = true balances the ranks of an SP group and needs "
                          f"parallel.sp > 1, got parallel.sp = {p.sp}")
    return cfg


def _check_packed_linear(m: ModelConfig, p: ParallelConfig) -> None:
    """Packed documents reach linear layers over an SP group as resets (log decays of -inf): only the backends
    that compute those exactly (torch, naive, triton; "auto" picks one of them) may run them there. With
    parallel.sp = 1 every backend takes them (fla as rows of a padded batch)."""
    if m.linear_variant in DELTA_VARIANTS:
        raise ConfigError(f"data.pack_documents = true does not support model.linear_variant = {m.linear_variant!r} "
                          f"(model.pattern = {m.pattern!r} has linear layers): the delta-rule kernels do not compute "
                          "a reset between documents exactly; use linear, lightning, simple_gla or gla")
    backend = p.linear_backend
    if p.sp == 1 or backend in RESET_BACKENDS + ("auto",):
        return
    raise ConfigError(f"data.pack_documents = true with linear layers (model.pattern = {m.pattern!r}) and "
                      f"parallel.sp = {p.sp} needs parallel.linear_backend = auto, torch, naive or triton, got "
                      f"{backend!r}: over an SP group documents enter linear attention as log decays of -inf, "
                      "which only those backends are known to compute exactly")
