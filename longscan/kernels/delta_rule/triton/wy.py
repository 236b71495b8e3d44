"""path="wy": the delta rule with tensor-core products, composed of its stages as one autograd.Function.

Chunks of 64 tokens. Forward: every chunk's P = (I + A)⁻¹, W and U (``wy_prep``, parallel), the state across
chunks (``wy_state``, serial, per block of V columns), the outputs (``wy_output``, parallel). Backward: the
output's share of dv_n (parallel), the state's gradient across chunks (serial), then dq, dk, dW and the
gate's shares (parallel) and the WY backward to dk, dv, dβ, dg (parallel), ``wy_grads``. Every product's
operands are in the inputs' dtype (bf16 on a GPU: tensor cores), its sums in float32; P, W, U, the state
entering each chunk and v_n are kept in the inputs' dtype for the backward.

Covers no gate, a scalar gate and per-key gates (KDA: the decays inside a chunk through ``wy_decay``; K̄, Q̃
and exp(b_C) formed once by ``wy_prep`` for the serial kernels, and the decayed scores Q Kᵀ ⊙ D for the output
and dv_local, all kept). q None (the SP stages' segment
transitions) is the scan without outputs: no output kernel, and the backward drops the output's shares (no
dv_local, no do terms in the serial pass or ``_wy_dqkw``, no dq).
"""
from __future__ import annotations

import functools

import torch
import triton

from longscan.kernels.delta_rule.triton.options import DeltaTritonOptions
from longscan.kernels.delta_rule.triton.wy_decay import PER_KEY, gate_kind
from longscan.kernels.delta_rule.triton.wy_grads import wy_grads
from longscan.kernels.delta_rule.triton.wy_output import wy_output
from longscan.kernels.delta_rule.triton.wy_prep import wy_prepare
from longscan.kernels.delta_rule.triton.wy_state import wy_state_backward, wy_state_forward

WY_BLOCK_K = 64   # keys a step of the parallel stages' `[64, keys]` tiles (the serial ones hold every key)
WY_PER_KEY_BLOCK_K = 32   # the same for per-key gates (their `[64, keys]` decay factors besides: at 64 they spill)


def parallel_block_k(K: int, gate: int) -> int:
    """Keys a step of the parallel kernels for K keys and the kernels' GATE (``wy_decay.gate_kind``)."""
    return min(WY_PER_KEY_BLOCK_K if gate == PER_KEY else WY_BLOCK_K, max(16, triton.next_power_of_2(K)))


def serial_backward_gate(g, gk, o: DeltaTritonOptions):
    """The gate the serial backward reads: g itself, or with ``wy_gate_rows`` (which reads a scalar gate's
    cumulative sums) what ``wy_prepare`` returned for the later kernels."""
    return gk if o.wy_gate_rows else g


def parallel_settings(o: DeltaTritonOptions, forward: bool = False) -> dict:
    """The parallel kernels' settings (``forward``: the forward's, W/U and the output)."""
    block_v = o.wy_forward_block_v if forward and o.wy_forward_block_v is not None else o.block_v
    return dict(block_v=block_v, num_warps=o.num_warps, precision=o.input_precision)


def prepare_settings(o: DeltaTritonOptions) -> dict:
    """``wy_prepare``'s settings: the forward's parallel ones and the inverse's warps."""
    return dict(parallel_settings(o, forward=True), inverse_warps=o.wy_inverse_num_warps)


def input_grad_settings(o: DeltaTritonOptions) -> dict:
    """``wy_input_grads``' settings (and ``wy_grads``'): the parallel ones, the register cap and dA's form."""
    return dict(parallel_settings(o), max_registers=o.wy_max_registers, da_from_inputs=o.wy_bwd_from_inputs)


def serial_settings(o: DeltaTritonOptions) -> dict:
    """The serial kernels' settings."""
    return dict(block_v=o.wy_state_block_v, num_warps=o.wy_state_num_warps, num_stages=o.inter_num_stages,
                precision=o.input_precision)


class DeltaRuleWY(torch.autograd.Function):
    """(q or None, k, v, beta, g None, `[B, T, H]` or `[B, T, H, K]`, h0 or None) -> (o `[B, T, H, V]` in k's
    dtype or None when q is None, S_T float32).
    q and v are taken in k's dtype (the products' operands); h0 is read in any float dtype."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, options):
        k, v, beta = (x.contiguous() for x in (k, v.to(k.dtype), beta))
        g = g.contiguous() if g is not None else None
        q = q.to(k.dtype).contiguous() if q is not None else None
        bk = parallel_block_k(k.shape[-1], gate_kind(g))
        # gk: the gate the kernels after ``wy_prepare`` read (a scalar gate's cumulative sums in each chunk)
        P, W, U, KB, QG, GC, QK, gk = wy_prepare(q, k, v, beta, g, block_k=bk, **prepare_settings(options))
        HS, VN, HT = wy_state_forward(k, gk, KB, GC, W, U, h0, **serial_settings(options))
        o = (wy_output(q, k, gk, QG, QK, HS, VN, scale, block_k=bk, **parallel_settings(options, forward=True))
             if q is not None else None)
        ctx.save_for_backward(q, k, v, beta, g, gk, P, W, U, HS, VN, KB, QG, GC, QK)
        ctx.scale, ctx.options, ctx.bk = scale, options, bk
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        return o, HT

    @staticmethod
    def backward(ctx, dO, dHT):
        q, k, v, beta, g, gk, P, W, U, HS, VN, KB, QG, GC, QK = ctx.saved_tensors
        o = ctx.options
        if q is None:      # a segment transition: no output, so no output gradient
            dO = None
        elif dO is None:   # only the final state reached the loss
            dO = torch.zeros(v.shape, device=v.device, dtype=k.dtype)
        else:
            dO = dO.contiguous().to(k.dtype)
        state_backward = functools.partial(wy_state_backward, q, k, serial_backward_gate(g, gk, o), QG, KB, GC, W, dO,
                                           dHT=dHT, scale=ctx.scale,
                                           V=v.shape[-1], gate_rows=o.wy_gate_rows, **serial_settings(o))
        dq, dk, dv, dbeta, dg, dh0 = wy_grads(q, k, v, beta, gk, QK, P, W, U, HS, VN, dO, ctx.scale,
                                              state_backward, block_k=ctx.bk, **input_grad_settings(o))
        dh0 = dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None
        return dq, dk, dv, dbeta, dg, dh0, None, None


def wy_scan(*, q, k, v, beta, g, h0, scale: float, options: DeltaTritonOptions):
    """-> (o `[B, T, H, V]` in k's dtype (None when q is None), final state `[B, H, K, V]` float32)."""
    _, T, H, K = k.shape
    V = v.shape[-1]
    if T * H * max(K, V) >= 2 ** 31:   # the serial kernels' offsets inside a sequence are int32
        raise ValueError(f"path='wy' takes T·H·max(K, V) below 2³¹ a sequence, got T={T}, H={H}, K={K}, V={V}")
    return DeltaRuleWY.apply(q, k, v, beta, g, h0, scale, options)
