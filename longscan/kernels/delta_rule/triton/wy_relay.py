"""path="wy" for the delta rule's state relay (``longscan.parallel.delta_rule.relay``): a rank's local pass run
a block of V columns at a time from a carry that arrives block by block, with every quantity that does not
depend on v formed once.

Per local segment, before the chain: ``wy_prepare`` once (P, W, and for per-key gates K̄, Q̃, exp(b_C); U =
P Diag(β) V for every column at once: it needs no state). The chain then runs, for each block of columns,
only the serial state pass on those columns (``wy_state_forward_columns`` from the block's entering state,
writing its columns of the V-wide HS and VN: its leaving state goes on at once); the outputs (``wy_output``)
run once the chain is through, over every column. Backward: the output's share of dv_n (``wy_dv_local``, no
state needed) once, then per block along the reverse chain the serial pass on its columns
(``wy_state_backward_columns`` from the block's dS_out: dS_in goes on), and once the chain is through the
parallel stages over every column (``wy_input_grads``). So the kernels' work is the plain kernel's, with no
copy of a chunk quantity; only the block states the chain carries are reshaped.
"""
from __future__ import annotations

import torch

from longscan.kernels.delta_rule.triton.options import DeltaTritonOptions
from longscan.kernels.delta_rule.triton.wy import _kw, _state_kw, parallel_block_k
from longscan.kernels.delta_rule.triton.wy_decay import gate_kind
from longscan.kernels.delta_rule.triton.wy_grads import wy_dv_local, wy_input_grads
from longscan.kernels.delta_rule.triton.wy_output import wy_output
from longscan.kernels.delta_rule.triton.wy_prep import wy_prepare
from longscan.kernels.delta_rule.triton.wy_state import wy_state_backward_columns, wy_state_forward_columns


def _segment(x: torch.Tensor | None, n: int, slot: int) -> torch.Tensor | None:
    """Local segment ``slot`` of `[B, T, ...]` cut into n equal segments, contiguous."""
    if x is None or n == 1:
        return x if x is None else x.contiguous()
    return x.reshape((x.shape[0], n, x.shape[1] // n) + tuple(x.shape[2:]))[:, slot].contiguous()


def _join(parts: list, n: int) -> torch.Tensor:
    return parts[0] if n == 1 else torch.stack(parts, dim=1).flatten(1, 2)


class _Segment:
    """One local segment's inputs (in k's dtype, as the kernels take them) and what its stages keep."""

    def __init__(self, q, k, v, beta, g, options: DeltaTritonOptions):
        self.q, self.k, self.v, self.beta, self.g = q, k, v, beta, g
        self.bk = parallel_block_k(k.shape[-1], gate_kind(g))
        self.P, self.W, self.U, self.KB, self.QG, self.GC = wy_prepare(q, k, v, beta, g, block_k=self.bk,
                                                                       **_kw(options))
        B, _, H, K = k.shape
        N = self.U.shape[2] // 64
        # the states entering each chunk and v_n over every column; each block's pass writes its columns
        self.HS = torch.empty(B, H, N, K, v.shape[-1], device=k.device, dtype=k.dtype)
        self.VN = torch.empty_like(self.U)
        self.DHS = self.DVN = self.dv_local = self.do = None   # the same for the backward


class WYRelay:
    """``RelayStages`` on path="wy" (``relay.RelayStages``): q, k, v, beta, g `[B, T, H, ...]` of the rank's
    n_local segments; ``keep``: gradients are wanted (the chunk quantities stay for the backward)."""

    def __init__(self, q, k, v, beta, g, scale: float, n_local: int, options: DeltaTritonOptions, keep: bool):
        if options.path != "wy":
            raise ValueError(f"WYRelay runs path='wy', got path={options.path!r}: pass options.resolved(k.dtype)")
        _, T, H, K = k.shape
        V = v.shape[-1]
        if T * H * max(K, V) >= 2 ** 31:   # the serial kernels' offsets inside a sequence are int32
            raise ValueError(f"path='wy' takes T·H·max(K, V) below 2³¹ a sequence, got T={T}, H={H}, K={K}, V={V}")
        self.scale, self.n, self.options, self.keep = scale, n_local, options, keep
        self.dtypes = tuple(x.dtype if x is not None else None for x in (q, k, v, beta, g))
        dt = k.dtype
        self.segments = [_Segment(_segment(q.to(dt), n_local, s), _segment(k, n_local, s),
                                  _segment(v.to(dt), n_local, s), _segment(beta, n_local, s),
                                  _segment(g, n_local, s), options) for s in range(n_local)]

    def forward_block(self, slot, c0, c1, S_in):
        seg = self.segments[slot]
        return wy_state_forward_columns(seg.k, seg.g, seg.KB, seg.GC, seg.W, seg.U, S_in, seg.HS, seg.VN, c0, c1,
                                        **_state_kw(self.options))

    def output(self):
        outs = []
        for seg in self.segments:
            outs.append(wy_output(seg.q, seg.k, seg.g, seg.HS, seg.VN, self.scale, block_k=seg.bk,
                                  **_kw(self.options)))
        if not self.keep:   # no backward: nothing to keep
            self.segments = []
        return _join(outs, self.n).to(self.dtypes[0])

    def backward_block(self, slot, c0, c1, dO, dS_out):
        seg = self.segments[slot]
        if seg.dv_local is None:   # the output's share of dv_n: every column at once, before the first block
            seg.do = (torch.zeros(seg.v.shape, device=seg.v.device, dtype=seg.k.dtype) if dO is None else
                      _segment(dO.to(seg.k.dtype), self.n, slot))
            seg.dv_local = wy_dv_local(seg.q, seg.k, seg.g, seg.do, self.scale, V=seg.v.shape[-1], block_k=seg.bk,
                                       **_kw(self.options))
            seg.DHS, seg.DVN = torch.empty_like(seg.HS), torch.empty_like(seg.VN)
        return wy_state_backward_columns(seg.q, seg.k, seg.g, seg.QG, seg.KB, seg.GC, seg.W, seg.do, seg.dv_local,
                                         dS_out, seg.DHS, seg.DVN, c0, c1, self.scale, **_state_kw(self.options))

    def grads(self):
        parts = []
        for seg in self.segments:
            parts.append(wy_input_grads(seg.q, seg.k, seg.v, seg.beta, seg.g, seg.P, seg.W, seg.U, seg.HS, seg.VN,
                                        seg.DHS, seg.DVN, seg.do, self.scale, block_k=seg.bk, **_kw(self.options)))
        self.segments = []
        return tuple(None if dtype is None else _join([p[i] for p in parts], self.n).to(dtype)
                     for i, dtype in enumerate(self.dtypes))
