"""Predicted peak memory of one GPU for a training config, before any process starts.

The prediction takes, for a rank of the first pipeline stage (the one that holds the most microbatches),
the largest of three moments:

- the end of the forward: float32 parameters, AdamW's two float32 moments (split over DP under ZeRO-1), the
  bf16 weight copies autocast keeps during the forward, every block's saved activations, the loss's;
- the loss's backward: the same without the weight copies, with the loss's transient (the float32 logits'
  gradient, or one chunk's logits);
- each block's backward: the gradients of the blocks above it, the saved activations of the blocks below it,
  and its own transient (a checkpointed stage recomputed, the MLP's backward, one tile of it when tiled, the
  kernels' gradient buffers; with tiled mixers one tile of their token-wise parts; with head groups one
  group's attention tensors and gradients, linear and softmax mixers alike), plus a few `[T, D]` float32
  buffers of the residual stream's gradient.

What a block saves depends on each stage's memory mode (none: everything its modules save; checkpoint: its
float32 input; offload: nothing) and is multiplied by the microbatches the 1F1B schedule holds at once.
The per-token counts of saved tensors are those of this model's modules: they are checked against the
bytes autograd actually saves on CPU (tests/training/test_memory.py). Kernel-internal scratch, the SP
collectives' buffers and the allocator's fragmentation are not modelled; ``reserve`` adds a margin for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longscan.models.args import ModelConfig
from longscan.models.args import MemoryOptions

GiB = 2 ** 30


@dataclass(frozen=True)
class Layout:
    """The parallel split and the batch one rank sees."""
    tp: int = 1
    pp: int = 1
    sp: int = 1
    dp: int = 1
    seq_len: int = 4096
    """Global sequence length (split over sp)."""
    micro_batch_size: int = 1
    microbatches: int = 1
    """Microbatches per optimizer step on one DP rank (1F1B holds min(pp, this) of them on the first stage)."""
    zero: bool = False
    """Optimizer states split over DP (DeepSpeed ZeRO-1)."""

    @property
    def tokens(self) -> int:
        """Tokens of one microbatch on one rank."""
        return self.micro_batch_size * self.seq_len // self.sp


@dataclass(frozen=True)
class Estimate:
    """Bytes by component at the moment of the peak; ``peak`` is their sum."""
    parts: dict = field(default_factory=dict)
    moment: str = ""
    """When the peak happens: "end of forward", "loss backward" or "block i backward"."""

    @property
    def peak(self) -> int:
        return int(sum(self.parts.values()))

    def table(self) -> str:
        rows = [f"| {k} | {v / GiB:.2f} |" for k, v in self.parts.items()]
        return "\n".join([f"| component (at {self.moment}) | GiB |", "| --- | --- |", *rows,
                          f"| **peak** | **{self.peak / GiB:.2f}** |"])


def layer_params(m: ModelConfig, kind: str, tp: int) -> int:
    """Parameters of one block on one TP rank."""
    D, I, H = m.dim, m.n_heads * m.hd // tp, m.n_heads // tp
    n = 2 * D + 3 * D * m.ffn // tp  # two norms, the MLP
    if kind == "L":
        n += 3 * D * I + I + I * D  # q, k, v, the per-head output norm, o
        n += {"gla": D * I, "simple_gla": D * H}.get(m.linear_variant, 0)
    else:
        n += D * I + 2 * D * (m.n_kv_heads * m.hd // tp) + I * D
    return n


def stage_params(m: ModelConfig, layout: Layout, pp_rank: int = 0) -> int:
    """Parameters of one pipeline stage on one TP rank."""
    per = m.n_layers // layout.pp
    n = sum(layer_params(m, m.layer_kind(i), layout.tp) for i in range(pp_rank * per, (pp_rank + 1) * per))
    vl = m.padded_vocab // layout.tp
    if pp_rank == 0:
        n += vl * m.dim
    if pp_rank == layout.pp - 1:
        n += m.dim + vl * m.dim
    return n


def _linear_saved(m: ModelConfig, I: int, H: int, act: int, mixer_tile: bool) -> int:
    """Bytes a linear-attention mixer stage of H heads (I = H·head_dim columns) saves per token."""
    D, v = m.dim, m.linear_variant
    if mixer_tile:  # x; q, k, v and the output; the float32 gate
        return 4 * D + 4 * act * I + {"gla": 4 * I, "simple_gla": 4 * H}.get(v, 0)
    norm = 4 * D + act * D + 4  # its float32 input, its output (the projections' input, autocast's dtype), 1/rms
    qkv = (5 if v in ("linear", "lightning") else 3) * act * I  # q, k (and before their SiLU), v
    gate = {"gla": 12 * I, "simple_gla": 12 * H}.get(v, 0)  # float32 logits, logsigmoid's buffer, g
    out = 2 * act * I + 4 * H  # the output (its norm's input), the norm's 1/rms, o_proj's input
    return norm + qkv + gate + out


def _softmax_saved(m: ModelConfig, I: int, Ikv: int, H: int, act: int, mixer_tile: bool) -> int:
    """Bytes a softmax mixer stage of H query heads (I = H·head_dim columns; Ikv those of k and v) saves per
    token."""
    attention = 8 * m.hd + act * (2 * I + 2 * Ikv) + 4 * H  # cos/sin; q, k (after RoPE), v, the output; lse
    if mixer_tile:  # x and the attention's tensors
        return 4 * m.dim + attention
    return 4 * m.dim + act * m.dim + 4 + attention  # the norm's float32 input, its output, 1/rms


def saved_per_token(m: ModelConfig, stage: str, tp: int, act: int, mixer_tile: bool = False,
                    head_groups: int = 1) -> int:
    """Bytes one stage saves for its backward per token with nothing checkpointed; stage: "L", "N" (mixers)
    or "mlp"; act: bytes of the activation dtype (2 under bf16 autocast, 4 in float32). The residual stream
    is float32 in both; the norms compute in float32 and return autocast's dtype. mixer_tile: the mixers'
    token-wise parts tiled (memory.mixer_tile), which keep the stage's input and what the attention itself
    keeps. head_groups > 1 (memory.mixer_head_groups): mixers keep their input only (and softmax mixers RoPE's
    cos/sin)."""
    D, hd = m.dim, m.hd
    I, H, Ikv = m.n_heads * hd // tp, m.n_heads // tp, m.n_kv_heads * hd // tp
    if stage == "L":
        return 4 * D if head_groups > 1 else _linear_saved(m, I, H, act, mixer_tile)
    if stage == "N":
        return 4 * D + 8 * hd if head_groups > 1 else _softmax_saved(m, I, Ikv, H, act, mixer_tile)
    norm = 4 * D + act * D + 4  # its float32 input, its output (the projections' input, autocast's dtype), 1/rms
    return norm + 3 * act * (m.ffn // tp)  # w1 x, w3 x (the fused SwiGLU recomputes silu), their product


def _stage_held(m, stage, mode, tp, act, tokens) -> int:
    if mode == "none":
        return saved_per_token(m, stage, tp, act) * tokens
    if mode == "checkpoint":
        return 4 * m.dim * tokens  # the stage's float32 input
    return 0  # offload: the input waits in host memory


def loss_bytes(m: ModelConfig, tp: int, act: int, tokens: int, chunk: int) -> tuple[int, int]:
    """(held until the backward, transient peak) of the output layer and the cross entropy."""
    vl = m.padded_vocab // tp
    if chunk == 0:
        # megatron's CE keeps the float32 softmax [T, V/TP]; beside it the logits in the activation dtype
        # (forward) or the gradient cast back to it (backward)
        extra = act if act != 4 else 0
        return 4 * vl * tokens + 4 * m.dim * tokens, extra * vl * tokens
    c = min(chunk, tokens)
    held = (4 + act) * m.dim * tokens + 4 * vl * m.dim  # hidden states, their gradient, the weight's gradient
    return held, (12 + act) * c * vl  # one chunk: float32 logits, exp, softmax - onehot, its cast


def _block(m: ModelConfig, kind: str, memory: MemoryOptions, whole_block: bool, tp: int, act: int,
           N: int) -> tuple[int, int]:
    """(bytes a block holds from its forward to its backward, its backward's largest transient)."""
    D = m.dim
    tiled_mixer = memory.mixer_tile > 0
    groups = memory.head_groups
    saved = {kind: saved_per_token(m, kind, tp, act, tiled_mixer, groups) * N,
             "mlp": saved_per_token(m, "mlp", tp, act) * N}
    if memory.mlp_tile:  # the tiled MLP keeps its input only
        saved["mlp"] = 4 * D * N
    I, Ikv, F = m.n_heads * m.hd // tp, m.n_kv_heads * m.hd // tp, m.ffn // tp
    rows = min(memory.mlp_tile, N) if memory.mlp_tile else N
    # the MLP's backward: the gradients of its intermediates (for one tile, recomputed, when tiled)
    mlp_bwd = (saved_per_token(m, "mlp", tp, act) * rows if memory.mlp_tile else 0) + 2 * act * F * rows
    if kind == "L":  # dq, dk, dv (and the per-key gate's float32 gradient)
        mixer_bwd = 3 * act * I * N + (4 * I * N if m.linear_variant == "gla" else 0)
    else:  # dq, dk, dv
        mixer_bwd = act * (I + 2 * Ikv) * N
    if tiled_mixer:  # the output's gradient, and one tile of what the untiled parts would keep
        per_tile = saved_per_token(m, kind, tp, act) - saved_per_token(m, kind, tp, act, True)
        mixer_bwd += act * I * N + per_tile * min(memory.mixer_tile, N)
    if groups > 1 and kind == "N":  # one group recomputed: its q, k, v, output, lse, their gradients; a tile
        Ig, Ikvg, Hg = I // groups, Ikv // groups, m.n_heads // tp // groups
        attention = _softmax_saved(m, Ig, Ikvg, Hg, act, True) - 4 * D - 8 * m.hd
        per_tile = _softmax_saved(m, Ig, Ikvg, Hg, act, False) - _softmax_saved(m, Ig, Ikvg, Hg, act, True)
        grads = act * (2 * Ig + 2 * Ikvg)  # dq, dk, dv and the output's gradient
        mixer_bwd = (attention + grads) * N + per_tile * (min(memory.mixer_tile, N) if tiled_mixer else N)
    elif groups > 1:  # one group recomputed: its q, k, v, output, gate and their gradients; one tile around them
        Ig, Hg = I // groups, m.n_heads // tp // groups
        attention = _linear_saved(m, Ig, Hg, act, True) - 4 * D
        per_tile = _linear_saved(m, Ig, Hg, act, False) - _linear_saved(m, Ig, Hg, act, True)
        grads = 4 * act * Ig + (4 * Ig if m.linear_variant == "gla" else 0)
        mixer_bwd = (attention + grads) * N + per_tile * (min(memory.mixer_tile, N) if tiled_mixer else N)
    if whole_block:
        return 4 * D * N, saved[kind] + saved["mlp"] + max(mixer_bwd, mlp_bwd)
    held, transient = 0, 0
    mixer_mode = memory.linear_layers if kind == "L" else memory.softmax_layers
    for stage, mode, bwd in ((kind, mixer_mode, mixer_bwd), ("mlp", memory.mlp, mlp_bwd)):
        if mode == "none":
            held += saved[stage]
            transient = max(transient, bwd)
        else:  # recomputed in the backward; offload brings its input back (and the one before ahead of use)
            held += 4 * D * N if mode == "checkpoint" else 0
            # what the recomputation saves less its input (the kept one itself, counted in held or brought back)
            recomputed = saved[stage] - 4 * D * N
            transient = max(transient, recomputed + bwd + (2 * 4 * D * N if mode == "offload" else 0))
    return held, transient


def estimate(m: ModelConfig, layout: Layout, memory: MemoryOptions, bf16: bool = True,
             whole_block_checkpointing: bool = False, reserve: float = 0.0) -> Estimate:
    """Predicted peak bytes per GPU of the first pipeline stage (which holds the loss too when pp = 1).

    The peak is the largest of three moments: the end of the forward (the bf16 weight copies autocast keeps
    for the forward, every block's saved tensors, the loss's), the loss's backward, and each block's backward
    (the gradients of the blocks above it made, the saved tensors of the blocks below it still held).
    whole_block_checkpointing: schedule.activation_checkpointing (each block's input kept, the whole block
    recomputed); reserve: fraction added on top for what is not modelled (allocator fragmentation, kernel
    scratch, collective buffers).
    """
    act = 2 if bf16 else 4
    tp, N, D = layout.tp, layout.tokens, m.dim
    per = m.n_layers // layout.pp
    kinds = [m.layer_kind(i) for i in range(per)]
    in_flight = min(layout.pp, layout.microbatches)  # microbatches whose activations 1F1B holds at once
    params = stage_params(m, layout, 0)
    opt = 8 * params // (layout.dp if layout.zero else 1)
    head = (m.padded_vocab // tp) * D + D if layout.pp == 1 else 0
    blocks = [_block(m, k, memory, whole_block_checkpointing, tp, act, N) for k in kinds]
    rope = 8 * m.hd * N if "N" in kinds else 0  # cos/sin, shared by the softmax layers
    held_all = sum(h for h, _ in blocks) * in_flight + rope
    loss_held, loss_peak = loss_bytes(m, tp, act, N, memory.loss_chunk) if layout.pp == 1 else (0, 0)
    residual = 3 * 4 * D * N  # the residual stream's gradient and the stage's input/output being passed
    base = {"parameters": 4 * params, "optimizer states": opt}
    moments = {
        "end of forward": {"bf16 weight copies": 2 * params if bf16 else 0, "saved activations": held_all,
                           "loss (held)": loss_held, "loss (transient)": loss_peak},
        "loss backward": {"gradients": 4 * head, "saved activations": held_all, "loss (held)": loss_held,
                          "loss (transient)": loss_peak, "residual gradients": residual},
    }
    grads_above = 4 * head
    for i in reversed(range(per)):
        grads_above += 4 * layer_params(m, kinds[i], tp)
        below = sum(h for h, _ in blocks[:i + 1]) + sum(h for h, _ in blocks) * (in_flight - 1) + rope
        moments[f"block {i} backward"] = {"gradients": grads_above, "saved activations": below,
                                          "block backward (transient)": blocks[i][1], "residual gradients": residual}
    moments["block 0 backward"]["gradients"] += 4 * (params - sum(layer_params(m, k, tp) for k in kinds) - head)
    name, parts = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    out = {**base, **{k: v for k, v in parts.items() if v}}
    if reserve:
        out["reserve"] = int(reserve * sum(out.values()))
    return Estimate(out, name)


def estimate_config(cfg, world_size: int, device_type: str = "cuda", reserve: float = 0.1) -> Estimate:
    """The estimate for a validated TrainConfig (``longscan.training.config``)."""
    p, d, s = cfg.parallel, cfg.data, cfg.schedule
    dp = p.dp or max(world_size // (p.tp * p.pp * p.sp), 1)
    layout = Layout(tp=p.tp, pp=p.pp, sp=p.sp, dp=dp, seq_len=d.seq_len, micro_batch_size=d.micro_batch_size,
                    microbatches=d.global_batch_size // (d.micro_batch_size * dp),
                    zero=cfg.optimizer.engine == "deepspeed")
    bf16 = s.precision == "bf16" or (s.precision == "auto" and device_type == "cuda")
    return estimate(cfg.model, layout, cfg.memory.options(), bf16=bf16,
                    whole_block_checkpointing=s.activation_checkpointing, reserve=reserve)


def check_capacity(cfg, world_size: int, capacity_bytes: int | None = None) -> Estimate | None:
    """Raise ConfigError when the predicted peak exceeds the GPU's memory (CUDA only, memory.check_capacity on).

    capacity_bytes: the device's memory (None: read from GPU 0; no CUDA: no check).
    """
    from longscan.training.config import ConfigError
    if not cfg.memory.check_capacity:
        return None
    if capacity_bytes is None:
        if not torch.cuda.is_available():
            return None
        capacity_bytes = torch.cuda.get_device_properties(0).total_memory
    est = estimate_config(cfg, world_size)
    if est.peak > capacity_bytes:
        p, d = cfg.parallel, cfg.data
        raise ConfigError(
            f"predicted peak memory {est.peak / GiB:.1f} GiB per GPU exceeds the device's {capacity_bytes / GiB:.1f} "
            f"GiB (data.seq_len = {d.seq_len} over parallel.sp = {p.sp}: {d.seq_len // p.sp} tokens a rank); "
            "lower it with memory.loss_chunk, memory.mlp_tile, memory.mixer_tile, memory.mixer_head_groups, "
            "memory.linear_layers / softmax_layers / mlp = checkpoint | offload, or a larger parallel.sp; "
            "memory.check_capacity=false tries anyway.\n"
            + est.table())
    return est
