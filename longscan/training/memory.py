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
  group's attention tensors and gradients, linear and softmax mixers alike), plus a few `[T, D]` buffers of
  the residual stream's gradient, and what recomputation holds beside them (:func:`recompute_extras`: an
  offloaded stage's recomputed output; with head groups the input's gradient and the previous group's). An
  offloaded block's or stage's backward is counted as measured on CPU (tests/training/test_memory_recompute.py):
  the largest of the moments its attention's backward, its MLP's backward and, per stage, the sum of its input
  gradient, with and without head groups.

What a block saves depends on each stage's memory mode (none: everything its modules save; checkpoint: its
input; offload: nothing), or on memory.blocks for whole blocks (only in the first memory.recompute_blocks
blocks of a stage; the others keep everything, mode none), and is multiplied by the microbatches the 1F1B
schedule holds at once. The residual stream (every stage's input) is float32, or bf16 under
model.residual_dtype = bfloat16.
The per-token counts of saved tensors are those of this model's modules: they are checked against the
bytes autograd actually saves on CPU (tests/training/test_memory.py). Kernel-internal scratch, the SP
collectives' buffers and the allocator's fragmentation are not modelled; ``reserve`` adds a margin for them.

Beside the GPU's peak, ``Estimate.host`` counts the host memory one process pins for offloaded stage inputs:
one `[tokens, dim]` residual stream per offloaded stage (or block), all held from the forward to their backward,
times the microbatches the schedule holds at once; each rounded up to a power of two by torch's pinned allocator,
or exactly its bytes under memory.pinned = exact. :func:`check_capacity` refuses a run whose prediction
exceeds either the GPU or this node's available host memory shared by its processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from longscan.models.args import DELTA_VARIANTS, ModelConfig
from longscan.models.args import MemoryOptions
from longscan.models.conv import CONV_KERNEL

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
    """Bytes by component at the moment of the GPU's peak; ``peak`` is their sum. ``host``: the pinned host
    bytes one process holds for offloaded stage inputs, by stage kind; ``host_bytes`` is their sum."""
    parts: dict = field(default_factory=dict)
    moment: str = ""
    """When the peak happens: "end of forward", "loss backward" or "block i backward"."""
    host: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def host_bytes(self) -> int:
        return int(sum(self.host.values()))

    def table(self) -> str:
        rows = [f"| {k} | {v / GiB:.2f} |" for k, v in self.parts.items()]
        host = [f"| host: offloaded inputs of the {k} | {v / GiB:.2f} |" for k, v in self.host.items()]
        if host:
            host.append(f"| **host (pinned, per process)** | **{self.host_bytes / GiB:.2f}** |")
        return "\n".join([f"| component (at {self.moment}) | GiB |", "| --- | --- |", *rows,
                          f"| **peak** | **{self.peak / GiB:.2f}** |", *host])


def gate_values(variant: str, I: int, H: int) -> int:
    """Values a token of a linear variant's gate, for H heads of I columns in all: one a key (gla, kda), one a
    head (simple_gla, gated_deltanet), or none."""
    return {"gla": I, "kda": I, "simple_gla": H, "gated_deltanet": H}.get(variant, 0)


def layer_params(m: ModelConfig, kind: str, tp: int) -> int:
    """Parameters of one block on one TP rank."""
    D, I, H = m.dim, m.n_heads * m.hd // tp, m.n_heads // tp
    n = 2 * D + 3 * D * m.ffn // tp  # two norms, the MLP
    if kind == "L":
        n += 3 * D * I + I + I * D  # q, k, v, the per-head output norm, o
        n += D * gate_values(m.linear_variant, I, H)  # the gate's projection
        if m.linear_variant in DELTA_VARIANTS:  # β's projection, the short convolutions of q, k, v
            n += D * H + 3 * I * CONV_KERNEL
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
    D, v, res = m.dim, m.linear_variant, m.residual_bytes
    if mixer_tile:  # x; q, k, v and the output; the float32 gate
        return res * D + 4 * act * I + 4 * gate_values(v, I, H)
    norm = res * D + act * D + 4  # its input (the residual stream), its output (autocast's dtype), 1/rms
    qkv = (5 if v in ("linear", "lightning") else 3) * act * I  # q, k (and before their SiLU), v
    gate = 12 * gate_values(v, I, H)  # float32 logits, logsigmoid's buffer, g
    out = 2 * act * I + 4 * H  # the output (its norm's input), the norm's 1/rms, o_proj's input
    return norm + qkv + gate + out


def _delta_saved(m: ModelConfig, I: int, H: int, act: int, wy: bool) -> float:
    """Bytes a delta-rule mixer stage (deltanet, gated_deltanet, kda) of H heads saves per token, with the
    Triton kernels of path wy (chunks of 64, products kept in the inputs' dtype) or float32 (chunks of
    DeltaTritonOptions.chunk, products kept in float32). Not counted: each short convolution's input padding,
    (kernel - 1) tokens a sequence, and its weight's autocast copy (constants)."""
    D, v, res, hd = m.dim, m.linear_variant, m.residual_bytes, m.hd
    gate = gate_values(v, I, H)
    norm = res * D + act * D + 4  # its input (the residual stream), its output (autocast's dtype), 1/rms
    convs = 3 * 2 * act * I  # each convolution's input and its SiLU's
    normalize = 2 * (act * I + 2 * act * H)  # q's and k's: the input, its norm and the norm's broadcast
    inputs = 3 * act * I + 4 * H  # q, k, v as the kernels take them, β (float32)
    gates = 3 * 4 * gate  # logsigmoid's input and buffer, g (float32)
    if wy:  # P `[64, 64]` a chunk; W, U, v_n; the state entering each chunk; b
        kernel = act * (64 * H + 3 * I + I * hd // 64) + 4 * gate
        if v == "kda":  # K̄, Q̃, the decayed scores Q Kᵀ ⊙ D; exp(b_C) a chunk
            kernel += act * (2 * I + 64 * H) + 4 * I // 64
    else:  # float32: P and Q Kᵀ `[C, C]` a chunk; W, K̄, Q̃, U_0; the state entering each chunk; the gate's total
        from longscan.kernels.delta_rule.triton.options import DeltaTritonOptions  # (imports Triton's kernels)
        C = DeltaTritonOptions().chunk
        kernel = 4 * (2 * C * H + 4 * I + I * hd // C) + 4 * gate / C
    out = 2 * act * I + 4 * H  # the output (its norm's input), the norm's 1/rms, o_proj's input
    return norm + convs + normalize + inputs + gates + kernel + out


def _softmax_saved(m: ModelConfig, I: int, Ikv: int, H: int, act: int, mixer_tile: bool) -> int:
    """Bytes a softmax mixer stage of H query heads (I = H·head_dim columns; Ikv those of k and v) saves per
    token."""
    attention = 8 * m.hd + act * (2 * I + 2 * Ikv) + 4 * H  # cos/sin; q, k (after RoPE), v, the output; lse
    res = m.residual_bytes
    if mixer_tile:  # x and the attention's tensors
        return res * m.dim + attention
    return res * m.dim + act * m.dim + 4 + attention  # the norm's input (the residual stream), its output, 1/rms


def saved_per_token(m: ModelConfig, stage: str, tp: int, act: int, mixer_tile: bool = False,
                    head_groups: int = 1, delta_path: str = "auto") -> float:
    """Bytes one stage saves for its backward per token with nothing checkpointed; stage: "L", "N" (mixers)
    or "mlp"; act: bytes of the activation dtype (2 under bf16 autocast, 4 in float32). The residual stream
    is float32 in both (model.residual_dtype = bfloat16: bf16); the norms compute in float32 and return
    autocast's dtype. mixer_tile: the mixers' token-wise parts tiled (memory.mixer_tile), which keep the
    stage's input and what the attention itself keeps. head_groups > 1 (memory.mixer_head_groups): mixers
    keep their input only (and softmax mixers RoPE's cos/sin)."""
    D, hd, res = m.dim, m.hd, m.residual_bytes
    I, H, Ikv = m.n_heads * hd // tp, m.n_heads // tp, m.n_kv_heads * hd // tp
    if stage == "L":
        if m.linear_variant in DELTA_VARIANTS:  # neither tiled nor grouped (the config refuses both)
            return _delta_saved(m, I, H, act, delta_path == "wy" or (delta_path == "auto" and act == 2))
        return res * D if head_groups > 1 else _linear_saved(m, I, H, act, mixer_tile)
    if stage == "N":
        return res * D + 8 * hd if head_groups > 1 else _softmax_saved(m, I, Ikv, H, act, mixer_tile)
    norm = res * D + act * D + 4  # its input (the residual stream), its output (autocast's dtype), 1/rms
    return norm + 3 * act * (m.ffn // tp)  # w1 x, w3 x (the fused SwiGLU recomputes silu), their product


def pinned_block_bytes(nbytes: int, pinned: str = "torch") -> int:
    """Host bytes a pinned tensor of ``nbytes`` takes. pinned = torch: torch's caching host allocator rounds each
    block up to a power of two (its default, PYTORCH_CUDA_ALLOC_CONF without pinned_max_round_threshold);
    exact (memory.pinned): longscan's pool page-locks exactly ``nbytes``."""
    if pinned == "exact":
        return nbytes
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


HOST_STAGES = (("blocks", "blocks"), ("linear_layers", "linear mixers"), ("softmax_layers", "softmax mixers"),
               ("mlp", "MLPs"))
"""The memory options whose offload mode holds stage (or block) inputs in host memory, and what those are."""


def offloaded_host_bytes(m: ModelConfig, layout: Layout, memory: MemoryOptions, pinned: bool = True,
                         whole_block_checkpointing: bool = False) -> dict:
    """Host bytes one process holds for offloaded stage inputs, by stage kind (only kinds that offload).

    Each offloaded stage of the first pipeline stage's blocks keeps its input, the residual stream
    `[micro_batch_size, tokens, dim]` in model.residual_dtype (float32: the embedding's output stays so under
    autocast), from its forward to its backward; memory.blocks = offload keeps one such input a block instead
    of one a stage. 1F1B holds min(pp, microbatches) forwards at once, each with its own stash.
    pinned: CUDA runs (page-locked blocks: rounded up to a power of two under memory.pinned = torch, exact under
    exact); False: plain host copies (CPU runs).
    """
    if whole_block_checkpointing:  # whole blocks are recomputed from inputs kept on the device
        return {}
    one = m.residual_bytes * m.dim * layout.tokens
    one = pinned_block_bytes(one, memory.pinned) if pinned else one
    in_flight = min(layout.pp, layout.microbatches)
    # memory.recompute_blocks: only the blocks that follow the modes offload
    kinds = [m.layer_kind(i) for i in range(m.n_layers // layout.pp) if memory.follows_modes(i)]
    stages = {"blocks": len(kinds), "linear_layers": kinds.count("L"), "softmax_layers": kinds.count("N"),
              "mlp": len(kinds)}
    return {what: stages[option] * one * in_flight for option, what in HOST_STAGES
            if getattr(memory, option) == "offload" and stages[option]}


def loss_bytes(m: ModelConfig, tp: int, act: int, tokens: int, chunk: int) -> tuple[int, int]:
    """(held until the backward, transient peak) of the output layer and the cross entropy."""
    vl = m.padded_vocab // tp
    if chunk == 0:
        # megatron's CE keeps the float32 softmax [T, V/TP]; beside it the logits in the activation dtype
        # (forward) or the gradient cast back to it (backward)
        extra = act if act != 4 else 0
        return 4 * vl * tokens + m.residual_bytes * m.dim * tokens, extra * vl * tokens
    c = min(chunk, tokens)
    # hidden states (the residual stream's dtype), their gradient, the weight's gradient
    held = (m.residual_bytes + act) * m.dim * tokens + 4 * vl * m.dim
    return held, (12 + act) * c * vl  # one chunk: float32 logits, exp, softmax - onehot, its cast


def _block(m: ModelConfig, kind: str, memory: MemoryOptions, whole_block: bool, tp: int, act: int,
           N: int, delta_path: str = "auto") -> tuple[int, int]:
    """(bytes a block holds from its forward to its backward, its backward's largest transient).
    whole_block (schedule.activation_checkpointing) is memory.blocks = checkpoint."""
    D, res = m.dim, m.residual_bytes
    tiled_mixer = memory.mixer_tile > 0
    groups = memory.head_groups
    saved = {kind: saved_per_token(m, kind, tp, act, tiled_mixer, groups, delta_path) * N,
             "mlp": saved_per_token(m, "mlp", tp, act) * N}
    if memory.mlp_tile:  # the tiled MLP keeps its input only
        saved["mlp"] = res * D * N
    I, Ikv, F = m.n_heads * m.hd // tp, m.n_kv_heads * m.hd // tp, m.ffn // tp
    rows = min(memory.mlp_tile, N) if memory.mlp_tile else N
    # the MLP's backward: the gradients of its intermediates (for one tile, recomputed, when tiled)
    mlp_bwd = (saved_per_token(m, "mlp", tp, act) * rows if memory.mlp_tile else 0) + 2 * act * F * rows
    if kind == "L" and m.linear_variant in DELTA_VARIANTS:
        # dq, dk, dv, dβ; the kernels' dv_local, dv_n, dW and the chunks' state gradients; the gate's db and dg
        gate = gate_values(m.linear_variant, I, m.n_heads // tp)
        mixer_bwd = (act * (6 * I + I * m.hd // 64) + 4 * (m.n_heads // tp) + 8 * gate) * N
    elif kind == "L":  # dq, dk, dv (and the per-key gate's float32 gradient)
        mixer_bwd = 3 * act * I * N + (4 * I * N if m.linear_variant == "gla" else 0)
    else:  # dq, dk, dv
        mixer_bwd = act * (I + 2 * Ikv) * N
    if tiled_mixer:  # one tile of what the untiled parts would keep, and the output's gradient: beside the output
        # for a softmax attention, which keeps it; in its place for a linear one, which does not (the output
        # tiles' backward frees it before the attention's)
        per_tile = saved_per_token(m, kind, tp, act) - saved_per_token(m, kind, tp, act, True)
        mixer_bwd += (act * I * N if kind == "N" else 0) + per_tile * min(memory.mixer_tile, N)
    if groups > 1 and kind == "N":  # one group recomputed: its q, k, v, output, lse, their gradients; a tile
        Ig, Ikvg, Hg = I // groups, Ikv // groups, m.n_heads // tp // groups
        attention = _softmax_saved(m, Ig, Ikvg, Hg, act, True) - res * D - 8 * m.hd
        per_tile = _softmax_saved(m, Ig, Ikvg, Hg, act, False) - _softmax_saved(m, Ig, Ikvg, Hg, act, True)
        grads = act * (2 * Ig + 2 * Ikvg)  # dq, dk, dv and the output's gradient
        mixer_bwd = (attention + grads) * N + per_tile * (min(memory.mixer_tile, N) if tiled_mixer else N)
    elif groups > 1:  # one group recomputed: its q, k, v, output, gate and their gradients; one tile around them
        Ig, Hg = I // groups, m.n_heads // tp // groups
        attention = _linear_saved(m, Ig, Hg, act, True) - res * D
        per_tile = _linear_saved(m, Ig, Hg, act, False) - _linear_saved(m, Ig, Hg, act, True)
        grads = 4 * act * Ig + (4 * Ig if m.linear_variant == "gla" else 0)
        mixer_bwd = (attention + grads) * N + per_tile * (min(memory.mixer_tile, N) if tiled_mixer else N)
    block_mode = "checkpoint" if whole_block else memory.blocks
    if block_mode == "checkpoint":
        return res * D * N, saved[kind] + saved["mlp"] + max(mixer_bwd, mlp_bwd)
    # a recomputation uses the model's RoPE tables (held once, beside the blocks), it does not make them again.
    # Tiled mixers without head groups: the residual gradients counted are those of the attention's backward, and
    # the MLP's backward holds beside them its branch's gradient cast to autocast's dtype from a wider stream
    # (with head groups, their gradients counted beside every moment exceed what the MLP's backward holds)
    rope = 8 * m.hd * N if kind == "N" else 0
    tiled_alone = tiled_mixer and groups <= 1
    branch = act * D * N if res != act and tiled_alone else 0
    if block_mode == "offload":  # the block recomputed from its input brought back, the one before on its way;
        # the MLP's saved tensors are freed by its backward, before the mixer's
        return 0, (saved[kind] - res * D * N - rope + max(saved["mlp"] + mlp_bwd + branch, mixer_bwd)
                   + 2 * res * D * N)
    held, transient = 0, 0
    mixer_mode = memory.linear_layers if kind == "L" else memory.softmax_layers
    for stage, mode, bwd, shared, cast in ((kind, mixer_mode, mixer_bwd, rope, 0),
                                           ("mlp", memory.mlp, mlp_bwd, 0, branch)):
        if mode == "none":  # the RoPE tables it saves are the model's, counted once beside the blocks
            held += saved[stage] - shared
            transient = max(transient, bwd)
        elif mode == "checkpoint":  # recomputed in the backward from its input kept on the device
            held += res * D * N
            # what the recomputation saves less its input (the kept one itself, counted in held) and the tables
            transient = max(transient, saved[stage] - res * D * N - shared + bwd)
        else:  # offload: recomputed from its input brought back (and the one before ahead of use)
            # what the recomputation saves less its input (brought back) and the model's RoPE tables
            recomputed = saved[stage] - res * D * N - shared + bwd + cast
            if tiled_alone:  # beside the gradient the stage was called with (residual_grads): the MLP's input
                # gradient while its backward runs; once the branch's backward is over, the stage's input
                # gradient, the sum of that and the branch's (head groups count theirs in recompute_extras)
                recomputed = max(recomputed + (res * D * N if stage == "mlp" else 0), 2 * res * D * N)
            transient = max(transient, recomputed + 2 * res * D * N)
    return held, transient


def _block_mode(memory: MemoryOptions, whole_block: bool) -> str:
    """How whole blocks run: schedule.activation_checkpointing (whole_block) is memory.blocks = checkpoint."""
    return "checkpoint" if whole_block else memory.blocks


def residual_grads(m: ModelConfig, memory: MemoryOptions, whole_block: bool, tokens: int) -> int:
    """Bytes of the residual stream's gradients alive in a block's backward (beside the mixer's own tensors).

    With head groups, where the mixer's backward peaks: the gradient of the mixer's output, and the float32
    gradient of the groups' sum cast from it (the same tensor in a float32 stream); a block offloaded whole also
    holds the gradient of its output, which its backward was called with, beside the stream's gradient inside it
    (the MLP's part added). Tiled mixers without head groups, offloaded: the same but the groups' sum, where the
    attention's backward runs (what the MLP's backward and the gradients' sums add is in :func:`_block`).
    Otherwise three `[T, D]` in the stream's dtype."""
    D, res = m.dim, m.residual_bytes
    mode = _block_mode(memory, whole_block)
    called = res if mode == "offload" else 0
    if memory.head_groups > 1:
        return (called + res + (4 if res != 4 else 0)) * D * tokens
    if memory.mixer_tile and (mode == "offload" or (mode == "none" and memory.offloads)):
        # where a tiled mixer's backward peaks, at its attention's: the stream's gradient only (the branch's,
        # cast to autocast's dtype from a wider stream, is consumed by then by the output tiles' backward)
        return (called + res) * D * tokens
    return 3 * res * D * tokens


def recompute_extras(m: ModelConfig, kind: str, memory: MemoryOptions, whole_block: bool, tp: int, act: int,
                     tokens: int) -> dict:
    """What a block's backward holds beyond its transient and the residual gradients, by name (bytes).

    - an offloaded stage (or block) recomputes its output and keeps it, the root of the gradients it takes,
      until its backward returns: one `[T, D]` in the stream's dtype;
    - head groups: the gradient of the mixer's input, `[T, D]` in the stream's dtype, summed over the groups;
      and the previous group's input gradients (q, k, v and a gate's), still referenced while the next group's
      are made."""
    D, res, N = m.dim, m.residual_bytes, tokens
    out = {}
    stages = (memory.linear_layers if kind == "L" else memory.softmax_layers, memory.mlp)
    mode = _block_mode(memory, whole_block)
    if mode == "offload" or (mode == "none" and "offload" in stages):
        out["offloaded output (held)"] = res * D * N
    groups = memory.head_groups
    if groups > 1:
        I, Ikv, H = m.n_heads * m.hd // tp, m.n_kv_heads * m.hd // tp, m.n_heads // tp
        Ig, Ikvg, Hg = I // groups, Ikv // groups, H // groups
        if kind == "L":
            gate = 4 * gate_values(m.linear_variant, Ig, Hg)
            previous = 3 * act * Ig + gate
        else:
            previous = act * (Ig + 2 * Ikvg)
        out["head groups: input gradient"] = res * D * N
        out["head groups: previous group's gradients"] = previous * N
    return out


def estimate(m: ModelConfig, layout: Layout, memory: MemoryOptions, bf16: bool = True,
             whole_block_checkpointing: bool = False, reserve: float = 0.0, pinned: bool = True,
             delta_path: str = "auto") -> Estimate:
    """Predicted peak bytes per GPU of the first pipeline stage (which holds the loss too when pp = 1).

    The peak is the largest of three moments: the end of the forward (the bf16 weight copies autocast keeps
    for the forward, every block's saved tensors, the loss's), the loss's backward, and each block's backward
    (the gradients of the blocks above it made, the saved tensors of the blocks below it still held).
    whole_block_checkpointing: schedule.activation_checkpointing (each block's input kept, the whole block
    recomputed); reserve: fraction added on top for what is not modelled (allocator fragmentation, kernel
    scratch, collective buffers); pinned: offloaded inputs go to pinned memory (CUDA), as
    :func:`offloaded_host_bytes` counts them; delta_path: the delta rule's Triton path (kernels.delta_path;
    auto: wy for bf16, float32 otherwise).
    """
    act = 2 if bf16 else 4
    tp, N, D = layout.tp, layout.tokens, m.dim
    per = m.n_layers // layout.pp
    kinds = [m.layer_kind(i) for i in range(per)]
    in_flight = min(layout.pp, layout.microbatches)  # microbatches whose activations 1F1B holds at once
    params = stage_params(m, layout, 0)
    opt = 8 * params // (layout.dp if layout.zero else 1)
    head = (m.padded_vocab // tp) * D + D if layout.pp == 1 else 0
    # memory.recompute_blocks: the blocks past it keep their activations (every mode none)
    options = [memory.for_block(i) for i in range(per)]
    whole = [whole_block_checkpointing and memory.follows_modes(i) for i in range(per)]
    blocks = [_block(m, k, o, w, tp, act, N, delta_path) for k, o, w in zip(kinds, options, whole)]
    rope = 8 * m.hd * N if "N" in kinds else 0  # cos/sin, shared by the softmax layers
    held_all = sum(h for h, _ in blocks) * in_flight + rope
    loss_held, loss_peak = loss_bytes(m, tp, act, N, memory.loss_chunk) if layout.pp == 1 else (0, 0)
    # the residual stream's gradients; what a block's recomputation holds beside them, by name
    residual = [residual_grads(m, o, w, N) for o, w in zip(options, whole)]
    extras = [recompute_extras(m, k, o, w, tp, act, N) for k, o, w in zip(kinds, options, whole)]
    base = {"parameters": 4 * params, "optimizer states": opt}
    moments = {
        "end of forward": {"bf16 weight copies": 2 * params if bf16 else 0, "saved activations": held_all,
                           "loss (held)": loss_held, "loss (transient)": loss_peak},
        "loss backward": {"gradients": 4 * head, "saved activations": held_all, "loss (held)": loss_held,
                          "loss (transient)": loss_peak, "residual gradients": residual[-1]},
    }
    grads_above = 4 * head
    for i in reversed(range(per)):
        grads_above += 4 * layer_params(m, kinds[i], tp)
        below = sum(h for h, _ in blocks[:i + 1]) + sum(h for h, _ in blocks) * (in_flight - 1) + rope
        moments[f"block {i} backward"] = {"gradients": grads_above, "saved activations": below,
                                          "block backward (transient)": blocks[i][1], "residual gradients": residual[i],
                                          **extras[i]}
    moments["block 0 backward"]["gradients"] += 4 * (params - sum(layer_params(m, k, tp) for k in kinds) - head)
    name, parts = max(moments.items(), key=lambda kv: sum(kv[1].values()))
    out = {**base, **{k: v for k, v in parts.items() if v}}
    if reserve:
        out["reserve"] = int(reserve * sum(out.values()))
    return Estimate(out, name, offloaded_host_bytes(m, layout, memory, pinned, whole_block_checkpointing))


def estimate_config(cfg, world_size: int, device_type: str = "cuda", reserve: float = 0.1) -> Estimate:
    """The estimate for a validated TrainConfig (``longscan.training.config``)."""
    p, d, s = cfg.parallel, cfg.data, cfg.schedule
    dp = p.dp or max(world_size // (p.tp * p.pp * p.sp), 1)
    layout = Layout(tp=p.tp, pp=p.pp, sp=p.sp, dp=dp, seq_len=d.seq_len, micro_batch_size=d.micro_batch_size,
                    microbatches=d.global_batch_size // (d.micro_batch_size * dp),
                    zero=cfg.optimizer.engine == "deepspeed")
    bf16 = s.precision == "bf16" or (s.precision == "auto" and device_type == "cuda")
    return estimate(cfg.model, layout, cfg.memory.options(), bf16=bf16,
                    whole_block_checkpointing=s.activation_checkpointing, reserve=reserve,
                    pinned=device_type == "cuda", delta_path=cfg.kernels.delta_path)


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """Host memory available to new allocations on this machine: MemAvailable of ``meminfo`` (Linux), else
    the free physical pages (os.sysconf); None where neither is known. A container's own memory limit
    (cgroup) is not read."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _procs_per_node(world_size: int) -> int:
    """The rank processes of this node when the caller does not know them: torchrun's LOCAL_WORLD_SIZE, else
    one per visible GPU (at most the world)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local:
        return int(local)
    return max(min(world_size, torch.cuda.device_count()), 1)


def _host_fixes(cfg, world_size: int, capacity_bytes: int, host_per_process: int) -> list[str]:
    """The smallest sets of offloaded stage kinds whose switch to checkpoint fits both the host and the GPU."""
    from itertools import combinations
    options = [o for o, _ in HOST_STAGES if getattr(cfg.memory, o) == "offload"]
    for n in range(1, len(options) + 1):
        fits = []
        for chosen in combinations(options, n):
            memory = replace(cfg.memory, **{o: "checkpoint" for o in chosen})
            est = estimate_config(replace(cfg, memory=memory), world_size)
            if est.host_bytes <= host_per_process and est.peak <= capacity_bytes:
                fits.append(" ".join(f"memory.{o}=checkpoint" for o in chosen)
                            + f" (GPU {est.peak / GiB:.1f} GiB, host {est.host_bytes / GiB:.1f} GiB)")
        if fits:
            return fits
    return []


def _sp_for_host(cfg, world_size: int, host_per_process: int) -> int | None:
    """The smallest doubling of parallel.sp (the world growing with it) whose host memory per process fits."""
    sp = cfg.parallel.sp
    for _ in range(10):
        sp *= 2
        if cfg.data.seq_len % sp:
            return None
        wider = replace(cfg, parallel=replace(cfg.parallel, sp=sp))
        if estimate_config(wider, world_size * sp // cfg.parallel.sp).host_bytes <= host_per_process:
            return sp
    return None


def _lower_memory_hint(cfg, cpu: bool = False) -> str:
    """The options that lower the predicted peak, for a capacity error (on CPU offload moves nothing out of the
    host, and a bf16 residual stream needs bf16 autocast)."""
    kept = cfg.memory.recompute_blocks
    return ("lower it with memory.loss_chunk, memory.mlp_tile, memory.mixer_tile, memory.mixer_head_groups, "
            + ("memory.linear_layers / softmax_layers / mlp = checkpoint, " if cpu else
               "memory.blocks or memory.linear_layers / softmax_layers / mlp = checkpoint | offload, ")
            + (f"a larger memory.recompute_blocks (now {kept}: the other blocks of a stage keep their activations), "
               if kept >= 0 else "")
            + ("" if cpu else "model.residual_dtype = bfloat16, ")
            + "or a larger parallel.sp; memory.check_capacity=false tries anyway.\n")


def host_total_bytes() -> int | None:
    """This machine's physical memory, or None where it is not known."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_cpu_host(cfg, world_size: int, host_bytes: int | None, procs_per_node: int | None) -> Estimate | None:
    """A CPU run: every rank process holds its model states and activations in host memory, so the node's
    processes together must fit in the host's memory (None: this machine's physical memory; not what is free
    now, which the launcher and each rank would read differently)."""
    from longscan.training.config import ConfigError
    host_bytes = host_total_bytes() if host_bytes is None else host_bytes
    if host_bytes is None:
        return None
    est = estimate_config(cfg, world_size, device_type="cpu")
    procs = procs_per_node or _procs_per_node(world_size)
    if est.peak * procs > host_bytes:
        p, d = cfg.parallel, cfg.data
        raise ConfigError(
            f"predicted peak memory {est.peak / GiB:.1f} GiB per process × {procs} process(es) exceeds the host's "
            f"{host_bytes / GiB:.1f} GiB (a CPU run: data.seq_len = {d.seq_len} over parallel.sp = {p.sp}: "
            f"{d.seq_len // p.sp} tokens a rank, float32); " + _lower_memory_hint(cfg, cpu=True) + est.table())
    return est


def check_capacity(cfg, world_size: int, capacity_bytes: int | None = None, host_bytes: int | None = None,
                   procs_per_node: int | None = None, device_type: str | None = None) -> Estimate | None:
    """Raise ConfigError when the predicted peak exceeds the GPU's memory, or the pinned host memory of
    offloaded stage inputs exceeds this process's share of the host's; on a CPU run, when the predicted peaks
    of the node's processes together exceed the host's memory (memory.check_capacity on).

    device_type: "cuda" or "cpu" (None: "cuda" where capacity_bytes is given or CUDA is available).
    capacity_bytes: the device's memory (None: read from GPU 0; unread on CPU). host_bytes: on CUDA the memory
    available on this node, shared by its ``procs_per_node`` rank processes (None: read from this machine when
    the device's memory is too, i.e. capacity_bytes None; otherwise the host is not checked); on CPU the host's
    memory (None: this machine's). procs_per_node None: LOCAL_WORLD_SIZE, else one per GPU (one on CPU).
    """
    from longscan.training.config import ConfigError
    if not cfg.memory.check_capacity:
        return None
    if device_type is None:
        device_type = "cuda" if capacity_bytes is not None or torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        return _check_cpu_host(cfg, world_size, host_bytes, procs_per_node)
    this_machine = capacity_bytes is None
    if capacity_bytes is None:
        capacity_bytes = torch.cuda.get_device_properties(0).total_memory
    est = estimate_config(cfg, world_size)
    p, d = cfg.parallel, cfg.data
    if est.peak > capacity_bytes:
        raise ConfigError(
            f"predicted peak memory {est.peak / GiB:.1f} GiB per GPU exceeds the device's {capacity_bytes / GiB:.1f} "
            f"GiB (data.seq_len = {d.seq_len} over parallel.sp = {p.sp}: {d.seq_len // p.sp} tokens a rank); "
            + _lower_memory_hint(cfg) + est.table())
    if host_bytes is None and this_machine:
        host_bytes = host_available_bytes()
    if host_bytes is None or not est.host:
        return est
    procs = procs_per_node or _procs_per_node(world_size)
    share = host_bytes // procs
    if est.host_bytes > share:
        kinds = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in est.host.items())
        fixes = _host_fixes(cfg, world_size, capacity_bytes, share)
        sp = _sp_for_host(cfg, world_size, share)
        sp_hint = f": parallel.sp >= {sp} fits at {procs} process(es) a node" if sp else ""
        fix = (f"setting {' or '.join(fixes)} fits both" if fixes else
               "no choice of stage kinds to checkpoint fits both the host and the GPU")
        exact = (estimate_config(replace(cfg, memory=replace(cfg.memory, pinned="exact")), world_size).host_bytes
                 if cfg.memory.pinned == "torch" else est.host_bytes)
        hint = "".join(h for h, apply in (
            (f"memory.pinned=exact page-locks exactly each input's bytes, not a power of two ({exact / GiB:.1f} "
             f"GiB per process{', which fits' if exact <= share else ''}); ", exact < est.host_bytes),
            ("memory.blocks=offload halves the inputs of per-stage offload (one a block); ",
             cfg.memory.blocks == "none" and cfg.memory.options().offloads),
            ("model.residual_dtype=bfloat16 halves every offloaded input; ", cfg.model.residual_dtype == "float32"))
            if apply)
        raise ConfigError(
            f"predicted pinned host memory for offloaded activations {est.host_bytes / GiB:.1f} GiB per process "
            f"({kinds}) exceeds the host's available {host_bytes / GiB:.1f} "
            f"GiB shared by {procs} process(es) on this node ({share / GiB:.1f} GiB each): memory.blocks (one input "
            f"a block) or memory.linear_layers / softmax_layers / mlp (one a stage) = offload keep each offloaded "
            f"{cfg.model.residual_dtype} input ({d.micro_batch_size * d.seq_len // p.sp} tokens × model.dim = "
            f"{cfg.model.dim}) in host memory from its forward to its backward (memory.pinned = {cfg.memory.pinned}: "
            f"{'exactly its bytes' if cfg.memory.pinned == 'exact' else 'rounded up to a power of two'}). Set some "
            f"of them to checkpoint (the input then stays on the GPU): {fix}; or spread the sequence over a larger "
            f"parallel.sp (each process holds 1/sp of it{sp_hint}); {hint}memory.check_capacity=false tries anyway.\n" + est.table())
    return est
