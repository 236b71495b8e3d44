"""Tuning options of the Triton linear-attention kernels, as one frozen value passed down every call.

``LinearKernelOptions()`` is what the kernels use when a caller passes ``options=None``: the settings
measured fastest (docs/benchmarks.md). Tests and tuning scripts pass their own value instead of changing
module state, so two settings can run side by side in one process.
"""
from __future__ import annotations

import dataclasses
import weakref
from types import MappingProxyType
from typing import Mapping

# Kernels whose launch settings the options hold: the forward, the state pass, the backward's dq, dk and dv
# kernels, and the per-key gates' pre-pass without ("ops") and with ("ops_b") the backward's factors.
KERNELS = ("fwd", "state", "dq", "dk", "dv", "ops", "ops_b")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """One kernel's launch: tile (values for fwd/state/dv and the pre-pass's keys, keys for dq/dk), warps,
    pipeline stages."""
    block: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LaunchConfig.{name} must be a positive int, got {value!r}")
        if self.block & (self.block - 1):
            raise ValueError(f"LaunchConfig.block must be a power of two, got {self.block}")

    def launch(self) -> dict:
        """The keyword arguments of a Triton launch (the tile excluded)."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


def _configs(table: Mapping, name: str) -> Mapping[str, LaunchConfig]:
    """A read-only {kernel: LaunchConfig} from LaunchConfigs or dicts of their fields."""
    out = {}
    for kernel, cfg in table.items():
        if kernel not in KERNELS:
            raise ValueError(f"LinearKernelOptions.{name}: unknown kernel {kernel!r} (expected one of {KERNELS})")
        out[kernel] = cfg if isinstance(cfg, LaunchConfig) else LaunchConfig(**cfg)
    return MappingProxyType(out)


# num_stages=1 miscompiled the dv kernel at tile 32 on an H100 with Triton 3.6 (wrong dv), so these settings
# and benchmarks/tune_linear.py's sweep keep num_stages >= 2 for it.
_CONFIG = {"fwd": LaunchConfig(64, 4, 2),
           "state": LaunchConfig(128, 4, 3),
           "dq": LaunchConfig(64, 4, 2),
           "dk": LaunchConfig(128, 8, 3),
           "dv": LaunchConfig(64, 4, 3),
           "ops": LaunchConfig(64, 4, 1),
           "ops_b": LaunchConfig(64, 4, 1)}
# Per-key gates where they differ: their dk kernel also carries the gate gradient (smaller tiles, fewer
# registers), and their forward and dv kernels build level 0's keys from kd, which halves their shared memory
# so two programs share an SM at two stages.
_CONFIG_PER_KEY = {"dk": LaunchConfig(64, 4, 2),
                   "fwd": LaunchConfig(64, 4, 2),
                   "dv": LaunchConfig(64, 4, 2)}
# float32 inputs where they differ: their tiles take twice the bytes, and the bf16 settings of these kernels
# ask for more shared memory than a block may have on an H100 / H200 (232,448 bytes) at head dims 128
# (benchmarks/tuning/kernel_resources.py --dtype fp32; tests/kernels/test_kernel_shapes.py checks every kind).
_CONFIG_F32 = {"dk": LaunchConfig(64, 4, 2),
               "dv": LaunchConfig(64, 4, 2),
               "state": LaunchConfig(128, 4, 2)}   # the (q, do) pass with tf32x3 products asked 262,656 at 3
# For bf16 inputs whose gate needs a gradient: how each (gate kind, kernel) keeps its state products in float32
# precision, 1 tf32 or 2 two bf16 halves of the state (each kernel's faster one, docs/benchmarks.md).
_STATE_PRODUCTS_BF16 = {(2, "dq"): 2, (2, "dk"): 1, (3, "dq"): 1, (3, "dk"): 2}


@dataclasses.dataclass(frozen=True)
class LinearKernelOptions:
    """How the Triton linear-attention kernels cut and launch their work, how they round two of dq's products (the
    same result to bf16 round-off), and whether their log gates may hold −inf.

    chunk, chunk_per_key: tokens a chunk (no / scalar decay; per-key gates).
    segments: force the number of sequence segments (None: from the SM count, as below).
    split_below, programs_per_sm, min_segment_chunks: a sequence is cut into segments only when there are fewer
      than split_below programs per SM, then into as many as keep at most programs_per_sm programs per SM, no
      segment shorter than min_segment_chunks chunks (at most, not at least: no last wave of few programs).
    num_sms: the SM count the segment plan assumes (None: the device's).
    config, config_per_key: launch settings per kernel (config_per_key overrides config for per-key gates).
    config_f32: launch settings per kernel for float32 inputs (overrides both: their tiles are twice the bytes).
    keep_gate_operands: per-key gates, a forward that a backward follows keeps its decayed operands and the
      backward's factors (four tensors the size of q) so the backward runs no pre-pass of its own.
    gate_grad_f32_state: state products of a gate-gradient backward in float32 precision (bf16 states miss its
      tolerance); state_products_bf16 says how for bf16 inputs, per (gate kind, kernel).
    dq_scores_split: constant and scalar decays without the gate gradient (lightning attention's g_gamma) on
      bf16 / fp16 inputs: the dq kernel's intra-chunk dot takes the decayed causal scores as two halves in the
      inputs' dtype (one more dot a chunk, no memory traffic), not rounded once, so dq's error is the float32
      computation's rounded once (with the gate gradient the scalar gate's dq kernel spilled more with it). On:
      it costs g_gamma's forward+backward at most 2% (docs/benchmarks.md).
    dq_scores_split_per_key: the same for per-key gates (with or without the gate gradient). At the default
      launch settings the second dot spilled registers; with_per_key_dq_split() turns it on together with the
      settings that compile it without spills, for timing beside the defaults.
    dq_factor_f32: per-key gates, the backward's query factor exp(b) (what dq is multiplied by) is stored in
      float32, not in q's dtype: one rounding of dq fewer, for 2 more bytes per element of q written and read
      (and held from forward to backward with keep_gate_operands), so off by default (docs/linear_kernels.md).
    f32_gate_segment_chunks: float32 inputs with a scalar or per-key gate: segments of at most this many chunks
      (None: no cap), so that the gate gradient's sums over later tokens restart at each segment from a product of
      states: summed over a whole 4,096-token sequence a scalar gate's lost 2.2e-5 of dg, at 8 chunks 3.4e-6
      (docs/linear_kernels.md).
    float32_products: how the kernels multiply float32 inputs: "ieee" (true float32 products; at head dims 128
      the tiles spill heavily on Hopper, docs/benchmarks.md) or "tf32x3" (three tf32 products on the tensor
      cores, about float32's precision).
    resets: g may hold −inf (full resets): the kernels compile the reset arithmetic, which costs finite gates
      time, so it is off by default. Packed documents (cu_seqlens) turn it on themselves; a caller who puts −inf
      in g sets it. Off, −inf in g is refused with a ValueError on CPU tensors and, on CUDA, with
      LONGSCAN_CHECKS=1 (checking reads g back); otherwise it gives NaN.
    """
    chunk: int = 64
    chunk_per_key: int = 64
    segments: int | None = None
    split_below: int = 2
    programs_per_sm: int = 4
    min_segment_chunks: int = 8
    num_sms: int | None = None
    config: Mapping[str, LaunchConfig] = dataclasses.field(default_factory=lambda: _CONFIG)
    config_per_key: Mapping[str, LaunchConfig] = dataclasses.field(default_factory=lambda: _CONFIG_PER_KEY)
    config_f32: Mapping[str, LaunchConfig] = dataclasses.field(default_factory=lambda: _CONFIG_F32)
    keep_gate_operands: bool = True
    gate_grad_f32_state: bool = True
    state_products_bf16: Mapping[tuple, int] = dataclasses.field(default_factory=lambda: _STATE_PRODUCTS_BF16)
    dq_scores_split: bool = True
    dq_scores_split_per_key: bool = False
    dq_factor_f32: bool = False
    f32_gate_segment_chunks: int | None = 8
    float32_products: str = "ieee"
    resets: bool = False

    def __post_init__(self):
        for name in ("chunk", "chunk_per_key"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"LinearKernelOptions.{name} must be a power of two >= 16, got {value!r}")
        for name in ("split_below", "programs_per_sm", "min_segment_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LinearKernelOptions.{name} must be a positive int, got {value!r}")
        for name in ("segments", "num_sms", "f32_gate_segment_chunks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"LinearKernelOptions.{name} must be None or a positive int, got {value!r}")
        for name in ("keep_gate_operands", "gate_grad_f32_state", "dq_scores_split", "dq_scores_split_per_key",
                     "dq_factor_f32", "resets"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LinearKernelOptions.{name} must be True or False, got {getattr(self, name)!r}")
        if self.float32_products not in ("ieee", "tf32x3"):
            raise ValueError(f"LinearKernelOptions.float32_products must be 'ieee' or 'tf32x3', got "
                             f"{self.float32_products!r}")
        config = _configs(self.config, "config")
        missing = [k for k in KERNELS if k not in config]
        if missing:
            raise ValueError(f"LinearKernelOptions.config needs a setting for every kernel; missing {missing}")
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "config_per_key", _configs(self.config_per_key, "config_per_key"))
        object.__setattr__(self, "config_f32", _configs(self.config_f32, "config_f32"))
        modes = dict(self.state_products_bf16)
        if any(m not in (1, 2) for m in modes.values()):
            raise ValueError(f"LinearKernelOptions.state_products_bf16 modes must be 1 or 2, got {modes}")
        object.__setattr__(self, "state_products_bf16", MappingProxyType(modes))

    def launch_config(self, kernel: str, per_key: bool, float32: bool = False) -> LaunchConfig:
        """The launch settings of ``kernel`` (per_key: for per-key gates; float32: for float32 inputs)."""
        if float32 and kernel in self.config_f32:
            return self.config_f32[kernel]
        if per_key and kernel in self.config_per_key:
            return self.config_per_key[kernel]
        return self.config[kernel]

    def chunk_for(self, per_key: bool) -> int:
        return self.chunk_per_key if per_key else self.chunk

    def with_blocks(self, block: int) -> LinearKernelOptions:
        """Every kernel at tile ``block`` (4 warps, 2 stages) and no per-key overrides: small tiles, so that a
        test splits K and V over several programs as a GPU's tiling does."""
        tiles = {k: LaunchConfig(block, 4, 2) for k in KERNELS}
        return dataclasses.replace(self, config=tiles, config_per_key={}, config_f32={})

    def with_per_key_dq_split(self) -> LinearKernelOptions:
        """Per-key gates' dq with its intra-chunk scores as two halves (dq_scores_split_per_key), with the per-key
        dq kernel at 8 warps and its state products as two bf16 halves: the settings under which that kernel
        compiles without spills at head dims 128 on Triton 3.6 (at 4 warps and tf32 state products it spilled)."""
        dq = self.launch_config("dq", per_key=True)
        return dataclasses.replace(
            self, dq_scores_split_per_key=True,
            config_per_key={**self.config_per_key, "dq": LaunchConfig(dq.block, 8, dq.num_stages)},
            state_products_bf16={**self.state_products_bf16, (3, "dq"): 2})


DEFAULT = LinearKernelOptions()


# with_resets' results by the identity of the options they came from: a replace() validates every field again,
# which every call with packed documents paid on the host before its first launch
_RESETS_ON: dict = {}


def with_resets(options: LinearKernelOptions | None) -> LinearKernelOptions:
    """``options`` (None: the defaults) with ``resets`` on: for calls whose log gates hold −inf by construction
    (packed documents). Made once per options value (they are frozen), then looked up."""
    opts = resolve(options)
    if opts.resets:
        return opts
    ident = id(opts)
    slot = _RESETS_ON.get(ident)
    if slot is None or slot[0]() is not opts:
        slot = (weakref.ref(opts, lambda _, ident=ident: _RESETS_ON.pop(ident, None)),
                dataclasses.replace(opts, resets=True))
        _RESETS_ON[ident] = slot
    return slot[1]


def resolve(options: LinearKernelOptions | None) -> LinearKernelOptions:
    """``options``, or the defaults for None (TypeError for anything else)."""
    if options is None:
        return DEFAULT
    if not isinstance(options, LinearKernelOptions):
        raise TypeError(f"options must be a LinearKernelOptions or None, got {type(options).__name__}")
    return options
