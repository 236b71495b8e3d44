"""Settings of the delta rule's Triton backend, as one frozen value passed down every call.

``DeltaTritonOptions()`` is what the backend uses when a caller passes ``options=None``. Tests and
benchmarks pass their own value instead of changing module state, so two settings run side by side.
path="auto" (the default) is resolved by ``DeltaTritonOptions.resolved`` from the inputs' dtype before any
kernel runs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from longscan.kernels.delta_rule import TRITON_PATHS

INTRA = ("triton", "torch")
PRECISIONS = ("ieee", "tf32")
INVERSES = ("rows", "blocks")
PATHS = TRITON_PATHS
# the inputs' dtypes path="auto" runs on "wy": bf16 has float32's exponent range, so the chunk quantities kept
# in it hold the per-key decay factors; float32 inputs keep the float32 kernels' accuracy, and float16 (whose
# range the per-key factors of steep gates exceed) keeps them too
AUTO_WY_DTYPES = (torch.bfloat16,)
# settings that only one kernel set reads (path="wy" runs chunks of 64 and its own stages; path="float32" has
# no wy_state kernels); intra and recompute besides pick float32-only variants, checked on their own
FLOAT32_ONLY = ("chunk", "block_k", "inter_block_k", "intra_num_stages", "inverse")
WY_ONLY = ("wy_state_block_v", "wy_state_num_warps", "wy_gate_rows", "wy_max_registers", "wy_forward_block_v",
           "wy_inverse_num_warps", "wy_bwd_from_inputs")


def _power_of_two(name: str, value, least: int = 1, why: str = "", none: Optional[str] = None) -> None:
    """Refuse ``value`` unless it is an int power of two of at least ``least`` (``why``: the reason for that
    bound), or None where ``none`` says what None means."""
    if value is None and none is not None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < least or value & (value - 1):
        bound = f" of at least {least}{why}" if least > 1 else ""
        also = f"None{none} or " if none is not None else ""
        raise ValueError(f"DeltaTritonOptions.{name} must be {also}a power of two{bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DeltaTritonOptions:
    """chunk: tokens a chunk (the last one and sequences shorter than it are padded).
    intra: "triton" runs the chunks' own quantities (the WY representation) and their backward in Triton;
    "torch" keeps them batched torch under autograd with activation checkpointing (the earlier path, kept
    for comparison).
    block_v: V columns a program of the recurrence across chunks and of the intra stages' V loops.
    block_k: keys a step of the intra kernels (the per-key gates' `[C, C, block_k]` decays; the others'
    `[C, block_k]` tiles, so no `[C, K]` tile is held whole).
    inter_block_k: keys a block of the recurrence's state and `[C, K]` tiles, each product over K a batch of
    products over these many keys (fewer registers a thread); None: every key in one block.
    num_warps: warps of every kernel.
    intra_num_stages, inter_num_stages: software-pipelining stages (Triton's num_stages) of the intra kernels'
    loops and of the recurrence's loop over chunks; 1 keeps one copy of each loaded tile, more prefetch the
    next iterations' tiles into buffers. The intra kernels at K = V = 128 spill registers with more than 1
    (docs/delta_rule.md); the recurrence keeps Triton's 3, which prefetch the next chunk on its serial path.
    input_precision: of every kernel's dots, "ieee" (float32 products, exact to float32 round-off) or "tf32"
    (a GPU's tensor cores, about 3 significant digits a product; the triangular inverse is formed in float32
    either way).
    inverse: how the intra forward forms P = (I + A)⁻¹: "rows" (forward substitution, one row a step) or
    "blocks" (the two diagonal half-blocks side by side, joined by two float32 products: half the steps).
    recompute: keep only the inputs for the backward and run the forward's stages again there, instead of
    keeping every chunk's float32 quantities and entering state (several times the inputs' size); for
    intra="triton" (the torch intra path recomputes its own stage and keeps the recurrence's).
    path: "auto" (the default) runs "wy" for bf16 inputs and "float32" for the others (float32, float16), see
    ``resolved``; "float32" runs the kernels above (float32 operands and chunk quantities); "wy" runs the
    tensor-core kernels (``wy``): chunks of 64 whatever ``chunk`` says, products on the inputs' dtype
    (bf16 on a GPU) with float32 sums, chunk quantities kept in the inputs' dtype; its parallel kernels
    read block_v and num_warps, its serial ones (the state across chunks) wy_state_block_v,
    wy_state_num_warps and inter_num_stages, all input_precision (for float32 inputs). It covers no gate,
    a scalar gate and per-key gates, with q and without it (the SP stages' segment transitions). A setting
    that the chosen path does not read (``FLOAT32_ONLY`` on "wy", ``WY_ONLY`` on "float32") must keep its
    default, and intra="torch" or recompute=True need path="float32" (wy runs neither; "auto" may pick wy).
    wy_state_block_v, wy_state_num_warps: V columns and warps a program of path="wy"'s serial kernels
    (each holds a `[K, wy_state_block_v]` float32 state and `[64, K]` tiles). wy_state_block_v None chooses per
    launch (``wy_state.serial_block_v``): the widest of 64 and 32 columns at which a launch still has a program
    for every SM (many sequences × heads), else 16 (few: more programs run the chain side by side);
    wy_state_num_warps None: 8 at 64 columns, 4 below (``wy_state.serial_num_warps``).
    wy_gate_rows: path="wy" with a scalar gate, the serial backward scales its products' `[64, wy_state_block_v]`
    rows by the decays (K̄ dS as Diag(exp(b_C - b)) K dS, Q̃ᵀ do as Qᵀ Diag(exp(b)) do) instead of forming K̄ and
    Q̃ `[64, K]` in registers, so q and k are prefetched into shared memory as without a gate (fewer registers,
    more shared memory a program); the same result to round-off.
    wy_forward_block_v: V columns a program of path="wy"'s parallel forward kernels (W and U, and the output,
    which forms a chunk's Q Kᵀ once for each block of columns; wider blocks form it fewer times), None: block_v,
    which the parallel backward kernels read (they slow at 64).
    wy_inverse_num_warps: warps of path="wy"'s triangular inverse (twenty 16×16 tiles a chunk; at 2 a thread holds
    too many and spills; at 4, compiled as launched on Triton 3.6 for sm_90a, 255 registers and 176 bytes of
    spills, at 8 none).
    wy_bwd_from_inputs: path="wy"'s WY backward forms dA = -Pᵀ (dU Yᵀ + dW Xᵀ) Pᵀ from v and k, which it reads
    anyway, instead of -(dY Uᵀ + dX Wᵀ) from U and W (two `[64, K]`-sized reads a chunk fewer, two `[64, 64]`
    products more); no gate and scalar gates (per-key gates keep U and W).
    wy_max_registers: registers a thread of path="wy"'s parallel backward kernels (dq/dk/dW and the WY backward)
    may use (Triton's maxnreg), None: what ptxas picks. With a scalar gate they take more than 128, so one
    program of 8 warps an H100 SM; at 128 two fit (Triton 3.6: the WY backward without spills, dq/dk/dW 8 bytes);
    per-key gates spill at 128."""
    chunk: int = 32
    intra: str = "triton"
    block_v: int = 32
    block_k: int = 16
    inter_block_k: Optional[int] = None
    num_warps: int = 8
    intra_num_stages: int = 1
    inter_num_stages: int = 3
    input_precision: str = "ieee"
    inverse: str = "rows"
    recompute: bool = False
    path: str = "auto"
    wy_state_block_v: Optional[int] = None
    wy_state_num_warps: Optional[int] = None
    wy_gate_rows: bool = True
    wy_max_registers: Optional[int] = 128
    wy_forward_block_v: Optional[int] = 64
    wy_inverse_num_warps: int = 4
    wy_bwd_from_inputs: bool = False

    def __post_init__(self):
        for name in ("chunk", "block_v", "block_k", "num_warps", "intra_num_stages", "inter_num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DeltaTritonOptions.{name} must be a positive int, got {value!r}")
        tile = " (tl.dot's smallest tile)"
        _power_of_two("wy_inverse_num_warps", self.wy_inverse_num_warps)
        _power_of_two("wy_state_num_warps", self.wy_state_num_warps, none=" (chosen by the width)")
        _power_of_two("wy_state_block_v", self.wy_state_block_v, 16, tile, none=" (chosen per launch)")
        for name in ("block_v", "block_k", "num_warps"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"DeltaTritonOptions.{name} must be a power of two, got {value}")
        for name in ("block_v", "block_k"):
            if getattr(self, name) < 16:
                raise ValueError(f"DeltaTritonOptions.{name} must be at least 16 (tl.dot's smallest tile), "
                                 f"got {getattr(self, name)}")
        _power_of_two("inter_block_k", self.inter_block_k, 16, none="")
        _power_of_two("wy_forward_block_v", self.wy_forward_block_v, 16, tile, none=" (block_v)")
        r = self.wy_max_registers
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or not 32 <= r <= 248 or r % 8):
            raise ValueError(f"DeltaTritonOptions.wy_max_registers must be None or a multiple of 8 from 32 to 248, "
                             f"got {r!r}")
        for name in ("recompute", "wy_gate_rows", "wy_bwd_from_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DeltaTritonOptions.{name} must be a bool, got {getattr(self, name)!r}")
        if self.intra not in INTRA:
            raise ValueError(f"DeltaTritonOptions.intra must be one of {INTRA}, got {self.intra!r}")
        if self.inverse not in INVERSES:
            raise ValueError(f"DeltaTritonOptions.inverse must be one of {INVERSES}, got {self.inverse!r}")
        if self.path not in PATHS:
            raise ValueError(f"DeltaTritonOptions.path must be one of {PATHS}, got {self.path!r}")
        if self.path != "float32" and (self.intra != "triton" or self.recompute):
            name, value = ("intra", self.intra) if self.intra != "triton" else ("recompute", self.recompute)
            why = ("keeps its own chunk quantities" if self.path == "wy" else
                   "runs path='wy' for bf16 inputs, which keeps its own chunk quantities")
            raise ValueError(f"DeltaTritonOptions.{name}={value!r}: path={self.path!r} {why}: it takes "
                             f"intra='triton' and recompute=False; pass path='float32' to run {name}={value!r}")
        unread, reader = {"wy": (FLOAT32_ONLY, "float32"), "float32": (WY_ONLY, "wy")}.get(self.path, ((), None))
        for f in dataclasses.fields(self):
            if f.name in unread and getattr(self, f.name) != f.default:
                raise ValueError(f"DeltaTritonOptions.{f.name}: path={self.path!r} does not read it (path="
                                 f"{reader!r} and 'auto' do); leave it at {f.default!r}, got {getattr(self, f.name)!r}")
        if self.input_precision not in PRECISIONS:
            raise ValueError(f"DeltaTritonOptions.input_precision must be one of {PRECISIONS}, "
                             f"got {self.input_precision!r}")

    def resolved(self, dtype: torch.dtype) -> "DeltaTritonOptions":
        """The options that run for inputs (k) of ``dtype``: path="auto" becomes "wy" for ``AUTO_WY_DTYPES`` and
        "float32" otherwise, and the settings the chosen path does not read return to their defaults; a
        "float32" or "wy" path is returned as it is."""
        if self.path != "auto":
            return self
        path = "wy" if dtype in AUTO_WY_DTYPES else "float32"
        unread = FLOAT32_ONLY if path == "wy" else WY_ONLY
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in unread}
        return dataclasses.replace(self, path=path, **defaults)
