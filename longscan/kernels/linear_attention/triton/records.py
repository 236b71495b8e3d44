"""What one entry point of the kernels hands the next: the per-key gates' pre-pass outputs and the
per-segment states."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class _GateOperands:
    """Per-key gates: what _gate_operands_kernel wrote for one call. qd, kd like q / k (None where not asked
    for); the backward's factors eq = exp(b), ek = exp(b_C − b) like q, or None; totals `[B·H, NC, 2, K]` float32
    (the chunk totals and level 0's key scales, _chunk_totals and _chunk_scales); steep `[B·H, ns]` int32 marks."""
    qd: torch.Tensor | None
    kd: torch.Tensor | None
    eq: torch.Tensor | None
    ek: torch.Tensor | None
    totals: torch.Tensor
    steep: torch.Tensor

    @property
    def for_forward(self) -> bool:
        """Everything the forward reads."""
        return self.qd is not None and self.kd is not None

    @property
    def complete(self) -> bool:
        """Everything the backward reads."""
        return self.for_forward and self.eq is not None and self.ek is not None


@dataclasses.dataclass
class SegmentStates:
    """A long sequence's per-segment states, kept so a later call skips recomputing them.

    Segments of ``seg`` tokens; ``states`` `[B, H, ns, K, V]` float32: from zero over (k, v) (see
    :func:`segment_state`) or scaled from the segment start over (q, do) (the backward's, see
    :func:`prefix_grad`); ``log_decays`` `[B, H, ns, K]` float32, each segment's total log gate.
    ``prefixes`` `[B, H, ns, K, V]` float32, set by ``forward(..., return_saved=True)``: the states entering
    each segment, initial state included, so valid only for the same initial_state. The forward returns them
    in place of ``states`` (then None): the backward needs only the prefixes, and both would hold two states
    per segment until the backward. ``zero_prefixes`` (same shape), set beside ``states`` by
    ``segment_state(..., return_saved=True, keep_prefixes=True)``: the states entering each segment from a
    zero initial state, which a forward without initial_state uses in place of its own scan. ``operands``
    (per-key gates): what a pre-pass wrote, for the next call on the same inputs. Set by
    ``segment_state(..., return_saved=True)``: the decayed keys kd, which the forward then takes; by
    ``forward(..., return_saved=True)`` while options.keep_gate_operands: all the decayed operands and the backward's
    factors, so the backward (and ``prefix_grad``) skip their own pre-pass. With operands the value is
    returned even for a sequence run as one segment."""
    seg: int
    states: torch.Tensor | None
    log_decays: torch.Tensor | None
    prefixes: torch.Tensor | None = None
    zero_prefixes: torch.Tensor | None = None
    operands: _GateOperands | None = None

    @property
    def n(self) -> int:
        """The number of segments."""
        if self.log_decays is not None:
            return self.log_decays.shape[2]
        return self.operands.steep.shape[1] if self.operands is not None else 1

    def operands_only(self) -> SegmentStates | None:
        """Only the gate operands (None without them): for a backward from another initial state than the
        forward's (SP's backward, whose forward may have run from zero prefixes), where the prefixes do not hold
        but the operands do."""
        return SegmentStates(self.seg, None, None, operands=self.operands) if self.operands is not None else None

