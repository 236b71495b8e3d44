"""What one entry point of the kernels hands the next: the per-key gates' pre-pass outputs and the
per-segment states."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class _GateOperands:
    """Per-key gates: what _gate_operands_kernel wrote for one call. qd, kd like q / k (None where not asked
    for); the backward's factors eq = exp(b), ek = exp(b_C − b) like q (eq float32 with
    options.dq_factor_f32), or None; totals `[B·H, NC, 2, K]` float32
    (the chunk totals and level 0's key scales, _chunk_totals and _chunk_scales); steep `[B·H, ns]` int32 marks
    of the segments where a key falls steeply (or resets), and, where g may hold resets (options.resets),
    steep_chunks `[B·H, NC]` int32 marks of such chunks (else None)."""
    qd: torch.Tensor | None
    kd: torch.Tensor | None
    eq: torch.Tensor | None
    ek: torch.Tensor | None
    totals: torch.Tensor
    steep: torch.Tensor
    steep_chunks: torch.Tensor | None

    @property
    def for_forward(self) -> bool:
        """Everything the forward reads."""
        return self.qd is not None and self.kd is not None

    @property
    def complete(self) -> bool:
        """Everything the backward reads."""
        return self.for_forward and self.eq is not None and self.ek is not None


@dataclasses.dataclass(frozen=True)
class StatePass:
    """The per-segment states of one state pass, kept so a later call skips recomputing them.

    Produced by :func:`segment_state` (``states`` from zero over (k, v), for ``forward(kv_states=)`` and the
    backward) and by :func:`prefix_grad` (``states`` scaled from each segment's start over (q, do), for
    ``backward(qdo_states=)``). Segments of ``seg`` tokens; ``states`` `[B, H, ns, K, V]` float32; ``log_decays``
    `[B, H, ns, K]` float32, each segment's total log gate. ``zero_prefixes`` (``segment_state(keep_prefixes=True)``):
    the states entering each segment from a zero initial state, which a forward without initial_state uses in
    place of its own scan. ``operands`` (per-key gates, ``segment_state``): what its pre-pass wrote (the decayed
    keys, and with q the queries' operands), which the forward then takes."""
    seg: int
    states: torch.Tensor
    log_decays: torch.Tensor
    zero_prefixes: torch.Tensor | None = None
    operands: _GateOperands | None = None

    @property
    def n(self) -> int:
        """The number of segments."""
        return self.log_decays.shape[2]


@dataclasses.dataclass(frozen=True)
class ForwardRecord:
    """What ``forward(return_saved=True)`` hands its backward (of the same inputs and initial_state).

    ``prefixes`` `[B, H, n, K, V]` float32: the states entering each of the ``n`` segments of ``seg`` tokens,
    initial state included (None for a sequence run as one segment); the backward needs only these, not the
    states they were scanned from. ``operands`` (per-key gates, while options.keep_gate_operands): the decayed
    operands and the backward's factors, so the backward (and ``prefix_grad``) skip their own pre-pass."""
    seg: int
    n: int
    prefixes: torch.Tensor | None = None
    operands: _GateOperands | None = None

    def operands_only(self) -> ForwardRecord | None:
        """Only the gate operands (None without them): for a backward from another initial state than the
        forward's (SP's backward, whose forward may have run from zero prefixes), where the prefixes do not hold
        but the operands do."""
        return ForwardRecord(self.seg, self.n, None, self.operands) if self.operands is not None else None
