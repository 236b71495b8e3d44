"""`longscan plan`: a cost model of one training step for each linear × softmax SP method on N GPUs.

- compute: measured per-token kernel costs (longscan/observe/costs/<gpu>.json, written on that GPU by
  benchmarks/kernel_costs.py) times the work each rank does: the matmuls at the measured matmul rate, the
  attention kernels, the forward recomputed by checkpointed or tiled stages, and the memory-bound work (norms,
  residual adds, activations, casts, the loss's logits, the optimizer) as bytes counted from the model's code
  over the measured copy rate (:func:`compute_parts`);
- communication: the bytes formulas of longscan.observe.comm (what `longscan profile` measures) over an
  interconnect's bandwidth, plus its latency per message on each method's critical path;
- memory: :func:`memory_per_gpu`, the memory estimator of longscan.training.memory;
- the longest sequence that fits: the memory model searched like `longscan sweep --max`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace

from longscan.models.args import DELTA_VARIANTS
from longscan.models.conv import CONV_KERNEL
from longscan.observe.comm import (LINEAR_METHODS, SOFTMAX_METHODS, LinearShape, SoftmaxShape, Traffic,
                                   chain_hops, conv_halo_bytes, delta_method_bytes, linear_method_bytes,
                                   softmax_method_bytes, total)
from longscan.observe.flops import linear_mixer_weights, matmul_flops_per_token

PROG = "longscan plan"
COSTS_DIR = os.path.join(os.path.dirname(__file__), "costs")
GPUS = ("h100", "h200")


@dataclass(frozen=True)
class Interconnect:
    """One link per GPU: bandwidth each way (bytes/s) and latency per message (s). Sources: docs/observability.md."""
    name: str
    bandwidth: float
    latency: float


INTERCONNECTS = {
    "nvlink4": Interconnect("nvlink4", 450e9, 3e-6),     # H100/H200 SXM: 900 GB/s both ways together
    "ib-ndr": Interconnect("ib-ndr", 50e9, 5e-6),        # 400 Gb/s NDR InfiniBand, one NIC per GPU
    "ib-hdr": Interconnect("ib-hdr", 25e9, 5e-6),        # 200 Gb/s HDR InfiniBand
    "pcie5": Interconnect("pcie5", 64e9, 5e-6),          # PCIe 5.0 x16
}


class PlanError(ValueError):
    """Input the cost model cannot answer; the message names the parameter."""


# ---- the measured table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelCosts:
    """Per-token costs measured on one GPU type (fwd + bwd, bf16)."""
    gpu: str
    memory_bytes: int
    matmul_flops_per_s: float
    linear_s_per_token_head: dict      # variant -> {head_dim (str): seconds per token per head}
    softmax_s_per_pair_head: dict      # head_dim (str) -> seconds per causal (query, key) pair per head
    copy_bytes_per_s: float | None = None
    """Device-to-device copy, bytes read + written per second; None (older tables): memory-bound work uncounted."""

    @staticmethod
    def load(path: str) -> "KernelCosts":
        with open(path) as f:
            d = json.load(f)
        try:
            copy = d.get("copy_bytes_per_s")
            return KernelCosts(d["gpu"], int(d["memory_bytes"]), float(d["matmul_flops_per_s"]),
                               d["linear_s_per_token_head"], d["softmax_s_per_pair_head"],
                               float(copy) if copy else None)
        except KeyError as e:
            raise PlanError(f"kernel-cost table {path} lacks the key {e}") from None

    def linear(self, variant: str, head_dim: int) -> float:
        try:
            return float(self.linear_s_per_token_head[variant][str(head_dim)])
        except KeyError:
            raise PlanError(f"the {self.gpu} table has no linear-attention cost for model.linear_variant={variant} "
                            f"at head dim {head_dim}; measure it on that GPU with benchmarks/kernel_costs.py "
                            f"--variants {variant} --head-dims {head_dim} --update") from None

    def softmax(self, head_dim: int) -> float:
        try:
            return float(self.softmax_s_per_pair_head[str(head_dim)])
        except KeyError:
            raise PlanError(f"the {self.gpu} table has no softmax-attention cost at head dim {head_dim}; measure it "
                            f"with benchmarks/kernel_costs.py --head-dims {head_dim}") from None


def costs_for(gpu: str, path: str | None = None) -> KernelCosts:
    """The table shipped for ``gpu`` (or the one at ``path``); PlanError when there is none."""
    if path:
        if not os.path.isfile(path):
            raise PlanError(f"--costs file not found: {path}")
        return KernelCosts.load(path)
    if gpu not in GPUS:
        raise PlanError(f"--gpu {gpu!r} is not known; choose one of {', '.join(GPUS)}")
    shipped = os.path.join(COSTS_DIR, f"{gpu}.json")
    if not os.path.isfile(shipped):
        raise PlanError(f"no measured kernel-cost table for --gpu {gpu} (longscan/observe/costs/{gpu}.json is not "
                        f"shipped yet): run `python benchmarks/kernel_costs.py` on an {gpu.upper()} to write it, or "
                        "pass --costs FILE")
    return KernelCosts.load(shipped)


# ---- the model --------------------------------------------------------------------------------------------------
def _elem(cfg) -> int:
    return 4 if cfg.schedule.precision == "fp32" else 2   # `auto` is bf16 on GPUs


def layer_traffic(cfg, rank: int) -> dict[str, Traffic]:
    """Bytes one rank's attention layers move in one training step (every microbatch): the comm formulas with
    the model's shapes. ``cfg`` must be validated (parallel.dp filled)."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    sp_rank = (rank // p.tp) % p.sp                     # megatron's order: tp, cp(sp), dp, pp
    pp_rank = rank // (p.tp * p.sp * p.dp)
    micro = d.global_batch_size // (d.micro_batch_size * p.dp)
    e = _elem(cfg)
    lin = LinearShape(d.micro_batch_size, m.n_heads // p.tp, m.hd, m.hd, 4)
    soft = SoftmaxShape(d.micro_batch_size, d.seq_len // p.sp, m.n_heads // p.tp, m.n_kv_heads // p.tp, m.hd, e, 4)
    per = m.n_layers // p.pp
    out = {}
    for i in range(pp_rank * per, (pp_rank + 1) * per):
        if m.layer_kind(i) == "L" and m.linear_variant in DELTA_VARIANTS:
            t = total(delta_method_bytes(p.linear_method, sp_rank, p.sp, p.layout, lin,
                                         transition=p.delta_transition))
            t = t + total(conv_halo_bytes(sp_rank, p.sp, p.layout, d.micro_batch_size, m.n_heads * m.hd // p.tp, e,
                                          CONV_KERNEL - 1))
        elif m.layer_kind(i) == "L":
            t = total(linear_method_bytes(p.linear_method, sp_rank, p.sp, p.layout, lin))
        else:
            t = total(softmax_method_bytes(p.softmax_method, sp_rank, p.sp, p.layout, soft))
        out[f"layers.{i}.attn"] = Traffic(t.sent * micro, t.recv * micro, t.calls * micro)
    return out


def _estimate(cfg, margin: bool):
    from longscan.training.memory import estimate_config
    p = cfg.parallel
    return estimate_config(cfg, p.tp * p.pp * p.sp * p.dp, device_type="cuda", reserve=0.1 if margin else 0.0)


def memory_per_gpu(cfg, margin: bool = True) -> float:
    """Predicted peak bytes per GPU: longscan.training.memory's estimate for this config (the one `longscan
    train` checks capacity with; with ``margin`` its 10% for what it does not model included). ``cfg`` must be
    validated (parallel.dp filled)."""
    return float(_estimate(cfg, margin).peak)


def host_per_process(cfg) -> float:
    """Predicted pinned host bytes per process for offloaded activations (0 without offload): what `longscan
    train` checks against the host's memory (power-of-two blocks under memory.pinned = torch, exact bytes under
    exact)."""
    return float(_estimate(cfg, False).host_bytes)


@dataclass(frozen=True)
class Prediction:
    linear_method: str
    softmax_method: str
    step_time_s: float
    compute_s: float
    exposed_comm_s: float
    comm_bytes_per_gpu: int
    memory_gib: float           # the predicted peak, without the capacity check's margin
    max_seq_len: int            # the longest that fits the GPU (and the host's share, where one is given)
    host_gib: float = 0.0       # pinned host memory per process for offloaded activations
    note: str = ""          # why this pair cannot run (its other fields are then 0)


def _comm_time(cfg, net: Interconnect, compute_softmax_s: float, compute_s: float) -> tuple[float, int]:
    """Exposed communication seconds of one step on the busiest rank, and that rank's bytes sent."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    micro = d.global_batch_size // (d.micro_batch_size * p.dp)
    W, bw, lat = p.sp, net.bandwidth, net.latency
    worst_bytes, exposed = 0, 0.0
    per = m.n_layers // p.pp
    kinds = [m.layer_kind(i) for i in range(per)]
    n_lin, n_soft = kinds.count("L"), kinds.count("N")
    if W > 1:
        worst_bytes = max(sum(t.sent for t in layer_traffic(cfg, r).values()) for r in range(p.tp * p.sp))
        lin = LinearShape(d.micro_batch_size, m.n_heads // p.tp, m.hd, m.hd, 4)
        state = lin.batch * lin.heads * lin.key_dim * lin.value_dim * 4
        n_local = 2 if p.layout == "zigzag" else 1
        chain = sum(chain_hops(r, W, p.layout)[0] for r in range(W))   # cross-rank hops along the chain
        delta = m.linear_variant in DELTA_VARIANTS
        if p.linear_method == "zeco":       # K blocks pipelined along the chain, forward and backward
            nb = min(4, m.hd)
            linear = 2 * (chain + nb - 1) * (lat + state / nb / bw)
        elif p.linear_method == "lasp1":    # whole states, one hop after another, forward and backward
            linear = 2 * chain * (lat + state / bw)
        elif delta:                         # all-gathers of the maps (M | S), K + V = 2V columns, and of the
            linear = (W - 1) * (2 * lat + (2 * n_local + n_local + 1) * state / bw)   # carries' gradients
        else:                               # ring all-gathers of n_local (forward) and n_local + 1 (backward) rows
            row = state * (m.hd + 1) / m.hd
            linear = (W - 1) * (2 * lat + (2 * n_local + 1) * row / bw)
        if delta:                           # q, k, v's halos: one message each, forward and backward
            halo = d.micro_batch_size * (CONV_KERNEL - 1) * (m.n_heads // p.tp) * m.hd * _elem(cfg)
            linear += 6 * (lat + halo / bw)
        exposed += linear * n_lin * micro
        e = _elem(cfg)
        kv = 2 * d.micro_batch_size * d.seq_len // W * (m.n_kv_heads // p.tp) * m.hd * e   # local K and V
        if p.softmax_method == "ring":      # each hop hidden behind one block's attention, where that is longer
            block = compute_softmax_s / max(1, n_soft * micro) / W      # forward third, backward two thirds
            fwd, bwd = lat + kv / bw, lat + (kv + kv * 4 / e) / bw      # backward: K, V and float32 dK, dV
            exposed += ((W - 1) * max(0.0, fwd - block / 3) + W * max(0.0, bwd - 2 * block / 3)) * n_soft * micro
        elif p.softmax_method == "allgather":   # gather K, V forward and backward, reduce-scatter float32 dK, dV
            exposed += (W - 1) * (3 * lat + (2 * kv + kv * 4 / e) / bw) * n_soft * micro
        else:                               # all-to-alls of q, k, v, o and of their gradients
            k_bytes = kv / 2
            q_bytes = k_bytes * m.n_heads / m.n_kv_heads
            exposed += (8 * (W - 1) * lat + 4 * (q_bytes + k_bytes) * (W - 1) / W / bw) * n_soft * micro
    g = p.dp * p.sp                          # the gradient all-reduce over DP × SP (float32)
    if g > 1:
        grad_bytes = 4 * (matmul_flops_per_token(m) // 6 + m.dim * m.padded_vocab) / (p.tp * p.pp)
        reduce = 2 * (g - 1) * lat + 2 * (g - 1) / g * grad_bytes / bw
        if cfg.optimizer.overlap_grad_reduce and cfg.optimizer.engine == "torch":
            # beside the backward (two thirds of the compute) it shows what the backward cannot hide, and at
            # least one layer's share: the first layer's gradients start when the backward ends
            reduce = max(reduce - 2 / 3 * compute_s, reduce / per)
        exposed += reduce
    if p.tp > 1:                             # two row-parallel all-reduces a layer, forward and backward
        act = d.micro_batch_size * d.seq_len // p.sp * m.dim * _elem(cfg)
        exposed += 4 * per * micro * (2 * (p.tp - 1) * lat + 2 * (p.tp - 1) / p.tp * act / bw)
    return exposed, worst_bytes


# Shares of the forward in the attention kernels' forward + backward: the chunked linear kernels (0.742 of
# 2.567 ms at 1×65536 on an H100 and an H200), the delta rule's wy kernels (0.37-0.41 over its three kinds at
# 16×4096, H100) and cuDNN flash attention (its fprop/bprop kernels at 64K, H200).
LINEAR_FWD_SHARE = 0.29
DELTA_FWD_SHARE = 0.39
# A rank's delta-rule work under SP with the matrix transition over the plain kernel's: the segment's transition
# M and contribution, then the outputs from the carry (benchmarks/sp_delta.py: 2.19× Gated DeltaNet, 1.89× KDA at
# 16×4096 on an H100; 2.03-2.06× by counting products).
DELTA_SP_LOCAL = 2.0
SOFTMAX_FWD_SHARE = 0.25
# Fused AdamW reads parameter, gradient and both moments and writes three (28 bytes, float32); the gradient
# norm, the clip and the zeroing read or write the gradient three more times.
OPTIMIZER_BYTES_PER_PARAM = 40


def _recomputed(cfg) -> tuple[int, int, int]:
    """(linear mixers, softmax mixers, MLPs) of a pipeline stage whose token-wise forward the backward runs again:
    stages recomputed by their mode (only in the blocks memory.recompute_blocks lets follow the modes), and
    tiled or head-grouped stages (in every block)."""
    mem = cfg.memory.options()
    kinds = [cfg.model.layer_kind(i) for i in range(cfg.model.n_layers // cfg.parallel.pp)]
    grouped = mem.mixer_head_groups > 1
    lin = soft = mlp = 0
    whole = cfg.schedule.activation_checkpointing or mem.blocks != "none"
    for i, kind in enumerate(kinds):
        modes = mem.follows_modes(i)
        mixer = mem.linear_layers if kind == "L" else mem.softmax_layers
        again = modes and (whole or mixer in ("checkpoint", "offload")) or mem.mixer_tile > 0 or grouped
        lin, soft = (lin + again, soft) if kind == "L" else (lin, soft + again)
        mlp += modes and (whole or mem.mlp in ("checkpoint", "offload")) or mem.mlp_tile > 0
    return lin, soft, mlp


def _kernel_recomputed(cfg, kind: str) -> float:
    """The share of a stage's ``kind`` ("L" or "N") mixers whose attention kernel itself runs twice (whole-stage
    recompute in the blocks that follow the modes, or a mixer run by head groups, which recomputes each group;
    tiles recompute around the kernel only)."""
    mem = cfg.memory.options()
    kinds = [cfg.model.layer_kind(i) for i in range(cfg.model.n_layers // cfg.parallel.pp)]
    mode = mem.linear_layers if kind == "L" else mem.softmax_layers
    whole = cfg.schedule.activation_checkpointing or mem.blocks != "none" or mode in ("checkpoint", "offload")
    ours = [i for i, k in enumerate(kinds) if k == kind]
    if not ours:
        return 0.0
    return sum(mem.mixer_head_groups > 1 or (whole and mem.follows_modes(i)) for i in ours) / len(ours)


def memory_bound_bytes(cfg) -> dict[str, float]:
    """Bytes the step's memory-bound kernels move per token of one rank, by stage, counted from the model's code:
    float32 residual stream (4 bytes), bf16 activations (2). A forward pass of a block reads x and writes each
    norm's bf16 output (6D twice), adds each branch to the float32 stream (10D twice), runs SwiGLU's SiLU and
    product (10·F) and the mixer's activations (linear: SiLU of q and k, the per-head output norm, 12·I; softmax:
    RoPE in float32 on q and k, about 30 bytes an element); the backward reads and writes about twice that
    (norms 10D, gradient adds 12D, the bf16 sum of the projections' input gradients 6D a further consumer,
    SwiGLU 18·F, mixer 18·I / RoPE 30 an element). Recomputed stages pay their forward twice."""
    m, p = cfg.model, cfg.parallel
    D, F = m.dim, m.ffn // p.tp
    I, Ikv = m.n_heads * m.hd // p.tp, m.n_kv_heads * m.hd // p.tp
    re_lin, re_soft, re_mlp = _recomputed(cfg)
    per = m.n_layers // p.pp
    kinds = [m.layer_kind(i) for i in range(per)]
    lin_f, lin_b = 16 * D + 12 * I, 31 * D + 18 * I               # norm + add forward; norm, adds, 2 consumers
    if m.linear_variant in DELTA_VARIANTS:
        # q, k, v's short convolutions and their SiLU (8 bytes an element each), q and k L2-normalised in
        # float32 and cast back (12 each), the output norm (4): 52·I forward, about 1.5 times that backward
        lin_f, lin_b = 16 * D + 52 * I, 31 * D + 78 * I
    soft_f, soft_b = 16 * D + 30 * (I + Ikv), 31 * D + 30 * (I + Ikv)
    mlp_f, mlp_b = 16 * D + 10 * F, 28 * D + 18 * F
    out = {"linear mixers": (kinds.count("L") + re_lin) * lin_f + kinds.count("L") * lin_b,
           "softmax mixers": (kinds.count("N") + re_soft) * soft_f + kinds.count("N") * soft_b,
           "MLPs": (per + re_mlp) * mlp_f + per * mlp_b}
    # the loss on the last stage (shared out over stages like the matmuls): float32 logits written, read for
    # their max and sum, the gradient written and cast, about six passes
    out["loss"] = 6 * 4 * m.padded_vocab / p.tp / p.pp
    return out


def compute_parts(cfg, costs: KernelCosts) -> dict[str, float]:
    """Seconds of one step's compute on one rank, by part (their sum is the compute time)."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    seqs = d.global_batch_size // p.dp                 # sequences this rank's replica trains per step
    tokens = seqs * d.seq_len // p.sp
    per = m.n_layers // p.pp
    kinds = [m.layer_kind(i) for i in range(per)]
    rate = costs.matmul_flops_per_s
    heads = m.n_heads // p.tp
    parts = {"matmuls": tokens * matmul_flops_per_token(m) / (p.tp * p.pp) / rate}
    linear = kinds.count("L") * tokens * heads * costs.linear(m.linear_variant, m.hd) if "L" in kinds else 0.0
    if m.linear_variant in DELTA_VARIANTS and p.sp > 1:
        linear *= DELTA_SP_LOCAL
    pairs = seqs * d.seq_len * (d.seq_len + 1) / 2 / p.sp
    softmax = kinds.count("N") * pairs * heads * costs.softmax(m.hd) if "N" in kinds else 0.0
    parts["linear attention"], parts["softmax attention"] = linear, softmax
    # the recomputed forward: a third of a stage's matmuls (forward 2 of 6 FLOPs a weight), and the kernels'
    # forward share where the whole stage runs again
    re_lin, re_soft, re_mlp = _recomputed(cfg)
    hd, D, F = m.hd, m.dim, m.ffn
    I, Ikv = m.n_heads * hd, m.n_kv_heads * hd
    w_lin, w_soft, w_mlp = linear_mixer_weights(m), 2 * D * I + 2 * D * Ikv, 3 * D * F
    again = re_lin * w_lin + re_soft * w_soft + re_mlp * w_mlp
    parts["recomputed forward"] = (tokens * 2 * again / (p.tp * p.pp) / rate
                                   + (DELTA_FWD_SHARE if m.linear_variant in DELTA_VARIANTS else LINEAR_FWD_SHARE)
                                   * linear * _kernel_recomputed(cfg, "L")
                                   + SOFTMAX_FWD_SHARE * softmax * _kernel_recomputed(cfg, "N"))
    if costs.copy_bytes_per_s:
        moved = sum(memory_bound_bytes(cfg).values()) * tokens
        n_params = (matmul_flops_per_token(m) // 6 + m.dim * m.padded_vocab) / (p.tp * p.pp)
        parts["memory-bound"] = moved / costs.copy_bytes_per_s
        parts["optimizer"] = OPTIMIZER_BYTES_PER_PARAM * n_params / costs.copy_bytes_per_s
    return parts


def compute_time(cfg, costs: KernelCosts) -> tuple[float, float]:
    """(compute seconds of one step on one rank, the softmax attention part of it)."""
    parts = compute_parts(cfg, costs)
    return sum(parts.values()), parts["softmax attention"]


def predict(cfg, costs: KernelCosts, net: Interconnect, host_bytes: float | None = None) -> Prediction:
    """host_bytes: the host memory one process may pin (None: the host is not a limit)."""
    compute, softmax = compute_time(cfg, costs)
    exposed, nbytes = _comm_time(cfg, net, softmax, compute)
    from longscan.observe.sweep import longest_fit   # the same search as `longscan sweep --max`
    pieces = cfg.parallel.sp * (2 if cfg.parallel.layout == "zigzag" else 1)
    step = 64 * pieces

    def fits(n: int) -> bool:
        est = _estimate(replace(cfg, data=replace(cfg.data, seq_len=n)), True)   # the host bytes take no margin
        return est.peak <= costs.memory_bytes and (host_bytes is None or est.host_bytes <= host_bytes)
    longest = longest_fit(step, step, 1 << 30, fits)
    here = _estimate(cfg, False)
    return Prediction(cfg.parallel.linear_method, cfg.parallel.softmax_method, compute + exposed, compute, exposed,
                      nbytes, here.peak / 2**30, longest, here.host_bytes / 2**30)


def plan(cfg, gpus: int, costs: KernelCosts, net: Interconnect, linear_methods=LINEAR_METHODS,
         softmax_methods=SOFTMAX_METHODS, host_bytes: float | None = None) -> list[Prediction]:
    """host_bytes: the host memory one process may pin for offloaded activations (None: not a limit)."""
    from longscan.training.config import ConfigError, validate
    for name, got, allowed in (("--linear-methods", linear_methods, LINEAR_METHODS),
                               ("--softmax-methods", softmax_methods, SOFTMAX_METHODS)):
        bad = [x for x in got if x not in allowed]
        if bad:
            raise PlanError(f"{name}: unknown method {bad[0]!r}; choose from {', '.join(allowed)}")
    out, errors = [], []
    for lm in linear_methods:
        for sm in softmax_methods:
            c = replace(cfg, parallel=replace(cfg.parallel, linear_method=lm, softmax_method=sm))
            try:
                c = validate(c, gpus)
            except ConfigError as e:   # e.g. ulysses with heads the SP size does not divide: that pair only
                errors.append(str(e))
                out.append(Prediction(lm, sm, 0.0, 0.0, 0.0, 0, 0.0, 0, note=str(e)))
                continue
            relay = c.parallel.delta_transition == "relay" and c.parallel.sp > 1
            if c.model.linear_variant in DELTA_VARIANTS and relay:
                note = ("parallel.delta_transition = 'relay' is not modelled: its chain runs each rank's state pass "
                        "in turn, a latency the kernel costs do not give")
                errors.append(note)
                out.append(Prediction(lm, sm, 0.0, 0.0, 0.0, 0, 0.0, 0, note=note))
                continue
            out.append(predict(c, costs, net, host_bytes))
    if len(errors) == len(out):
        raise PlanError(errors[0])
    return out


def format_table(preds: list[Prediction], cfg, gpus: int, gpu: str, net: Interconnect) -> str:
    p = cfg.parallel
    lines = [f"longscan plan | {gpus} × {gpu} over {net.name} | tp {p.tp} pp {p.pp} sp {p.sp} | seq {cfg.data.seq_len}",
             "| linear | softmax | step (ms) | compute (ms) | exposed comm (ms) | SP comm MB/GPU/step | memory/GPU (GiB) "
             "| pinned host/process (GiB) | longest seq that fits |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in preds:
        if r.note:
            lines.append(f"| {r.linear_method} | {r.softmax_method} | cannot run: {r.note} | | | | | | |")
            continue
        lines.append(f"| {r.linear_method} | {r.softmax_method} | {1e3 * r.step_time_s:.2f} | {1e3 * r.compute_s:.2f} "
                     f"| {1e3 * r.exposed_comm_s:.2f} | {r.comm_bytes_per_gpu / 2**20:.1f} | {r.memory_gib:.1f} "
                     f"| {r.host_gib:.1f} | {r.max_seq_len:,} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    a = argparse.ArgumentParser(prog=PROG, description="Predict step time, communication and memory per SP method.")
    a.add_argument("--config", default=None)
    a.add_argument("--gpus", type=int, required=True, help="GPUs in total (the world size)")
    a.add_argument("--gpu", default="h100", help=f"GPU type: {', '.join(GPUS)} (default h100)")
    a.add_argument("--interconnect", default="nvlink4", help=f"{', '.join(INTERCONNECTS)} (default nvlink4)")
    a.add_argument("--costs", default=None, help="a kernel-cost table (default: the one shipped for --gpu)")
    a.add_argument("--host-gib", type=float, default=None,
                   help="host memory per node for the training processes, GiB: with offload, the longest sequence "
                        "must also fit each process's share in pinned memory, counted as memory.pinned makes it "
                        "(torch: power-of-two blocks; exact: the bytes) (default: the host is not a limit)")
    a.add_argument("--gpus-per-node", type=int, default=8, help="processes sharing --host-gib (default 8, or --gpus "
                   "where fewer)")
    a.add_argument("--linear-methods", default=",".join(LINEAR_METHODS))
    a.add_argument("--softmax-methods", default=",".join(SOFTMAX_METHODS))
    a.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.seq_len=65536 parallel.sp=8")
    return a


def cmd_plan(argv: list[str]) -> int:
    from longscan.training.config import ConfigError, load_config
    a = parser().parse_args(argv)
    try:
        if a.gpus < 1:
            raise PlanError(f"--gpus must be >= 1, got {a.gpus}")
        if a.interconnect not in INTERCONNECTS:
            raise PlanError(f"--interconnect {a.interconnect!r} is not known; choose one of {', '.join(INTERCONNECTS)}")
        net = INTERCONNECTS[a.interconnect]
        if a.host_gib is not None and a.host_gib <= 0:
            raise PlanError(f"--host-gib must be > 0, got {a.host_gib}")
        if a.gpus_per_node < 1:
            raise PlanError(f"--gpus-per-node must be >= 1, got {a.gpus_per_node}")
        host = None if a.host_gib is None else a.host_gib * 2**30 / min(a.gpus_per_node, a.gpus)
        cfg = load_config(a.config, a.overrides)
        costs = costs_for(a.gpu, a.costs)
        preds = plan(cfg, a.gpus, costs, net,
                     tuple(x for x in a.linear_methods.split(",") if x),
                     tuple(x for x in a.softmax_methods.split(",") if x), host)
    except (PlanError, ConfigError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    print(format_table(preds, cfg, a.gpus, a.gpu, net))
    if costs.copy_bytes_per_s is None:
        print(f"note: the {costs.gpu} table has no copy rate, so memory-bound work (norms, activations, the optimizer) "
              "is not counted; measure it with benchmarks/kernel_costs.py")
    return 0
