"""path="wy" for the delta rule's state relay (``longscan.parallel.delta_rule.relay``): a rank's local pass run
a block of V columns at a time from a carry that arrives block by block, with every quantity that does not
depend on v formed once.

Per local segment, before the chain: ``wy_prepare`` once (P, W, and for per-key gates K̄, Q̃, exp(b_C) and
Q Kᵀ ⊙ D; U = P Diag(β) V for every column at once: it needs no state). The chain then runs, for each block
of columns, only the serial state pass on those columns (``wy_state_forward_columns`` from the block's entering
state, writing its columns of the V-wide HS and VN: its leaving state goes on at once); the outputs (``wy_output``)
run once the chain is through, over every column. Backward: the output's share of dv_n (``wy_dv_local``, no
state needed) once, then per block along the reverse chain the serial pass on its columns
(``wy_state_backward_columns`` from the block's dS_out: dS_in goes on), and once the chain is through the
parallel stages over every column (``wy_input_grads``). So the kernels' work is the plain kernel's, with no
copy of a chunk quantity; the serial passes read and write the block states in the chain's V-major carries by
strides, so no state is copied either.
"""
from __future__ import annotations

import torch

from longscan.kernels.delta_rule.triton.options import DeltaTritonOptions
from longscan.kernels.delta_rule.triton.wy import (input_grad_settings, parallel_block_k, parallel_settings,
                                                   prepare_settings, serial_backward_gate, serial_settings)
from longscan.kernels.delta_rule.triton.wy_decay import gate_kind
from longscan.kernels.delta_rule.triton.wy_grads import wy_dv_local, wy_input_grads
from longscan.kernels.delta_rule.triton.wy_output import wy_output
from longscan.kernels.delta_rule.triton.wy_prep import wy_prepare
from longscan.kernels.delta_rule.triton.wy_state import wy_state_backward_columns, wy_state_forward_columns


class _Segment:
    """One local segment's inputs (in k's dtype, as the kernels take them) and what its stages keep."""

    def __init__(self, q, k, v, beta, g, options: DeltaTritonOptions):
        self.q, self.k, self.v, self.beta, self.g = q, k, v, beta, g
        self.bk = parallel_block_k(k.shape[-1], gate_kind(g))
        # gk: the gate the kernels after ``wy_prepare`` read (a scalar gate's cumulative sums in each chunk)
        (self.P, self.W, self.U, self.KB, self.QG, self.GC, self.QK,
         self.gk) = wy_prepare(q, k, v, beta, g, block_k=self.bk, **prepare_settings(options))
        B, _, H, K = k.shape
        N = self.U.shape[2] // 64
        # the states entering each chunk and v_n over every column; each block's pass writes its columns
        self.HS = torch.empty(B, H, N, K, v.shape[-1], device=k.device, dtype=k.dtype)
        self.VN = torch.empty_like(self.U)
        self.DHS = self.DVN = self.dv_local = self.do = None   # the same for the backward


class WYRelay:
    """``RelayStages`` on path="wy" (``longscan.parallel.delta_rule.relay``): segments, (q, k, v, beta, g)
    `[B, T_seg, H, ...]` of each of the rank's local segments; ``keep``: gradients are wanted (the chunk
    quantities stay for the backward)."""

    def __init__(self, segments: list, scale: float, options: DeltaTritonOptions, keep: bool):
        if options.path != "wy":
            raise ValueError(f"WYRelay runs path='wy', got path={options.path!r}: pass options.resolved(k.dtype)")
        self.scale, self.options, self.keep = scale, options, keep
        self.segments = []
        for q, k, v, beta, g in segments:
            _, T, H, K = k.shape
            V = v.shape[-1]
            if T * H * max(K, V) >= 2 ** 31:   # the serial kernels' offsets inside a sequence are int32
                raise ValueError(f"path='wy' takes T·H·max(K, V) below 2³¹ a sequence, got T={T}, H={H}, K={K}, "
                                 f"V={V}")
            # q and v in k's dtype (the products' operands), as ``wy.DeltaRuleWY`` takes them
            self.segments.append(_Segment(q.to(k.dtype).contiguous(), k.contiguous(), v.to(k.dtype).contiguous(),
                                          beta.contiguous(), g.contiguous() if g is not None else None, options))

    def forward_block(self, slot, c0, c1, S_in, S_out):
        seg = self.segments[slot]
        wy_state_forward_columns(seg.k, seg.gk, seg.KB, seg.GC, seg.W, seg.U, S_in, seg.HS, seg.VN, c0, c1,
                                 out=S_out, **serial_settings(self.options))

    def outputs(self):
        outs = [wy_output(seg.q, seg.k, seg.gk, seg.QG, seg.QK, seg.HS, seg.VN, self.scale, block_k=seg.bk,
                          **parallel_settings(self.options, forward=True)) for seg in self.segments]
        if not self.keep:   # no backward: nothing to keep
            self.segments = []
        return outs

    def backward_block(self, slot, c0, c1, dO, dS_out, dS_in):
        seg = self.segments[slot]
        if seg.dv_local is None:   # the output's share of dv_n: every column at once, before the first block
            seg.do = (torch.zeros(seg.v.shape, device=seg.v.device, dtype=seg.k.dtype) if dO is None else
                      dO.to(seg.k.dtype).contiguous())
            seg.dv_local = wy_dv_local(seg.q, seg.k, seg.gk, seg.QK, seg.do, self.scale, V=seg.v.shape[-1],
                                       block_k=seg.bk, **parallel_settings(self.options))
            seg.DHS, seg.DVN = torch.empty_like(seg.HS), torch.empty_like(seg.VN)
        gate = serial_backward_gate(seg.g, seg.gk, self.options)
        wy_state_backward_columns(seg.q, seg.k, gate, seg.QG, seg.KB, seg.GC, seg.W, seg.do, seg.dv_local, dS_out,
                                  seg.DHS, seg.DVN, c0, c1, self.scale, gate_rows=self.options.wy_gate_rows,
                                  out=dS_in, **serial_settings(self.options))

    def grads(self):
        out = [wy_input_grads(seg.q, seg.k, seg.v, seg.beta, seg.gk, seg.P, seg.W, seg.U, seg.HS, seg.VN, seg.DHS,
                              seg.DVN, seg.do, self.scale, block_k=seg.bk, **input_grad_settings(self.options))
               for seg in self.segments]
        self.segments = []
        return out
