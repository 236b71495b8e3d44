"""The gradient of a learnable constant decay g_gamma `[H]`, in forward mode: dL/dγ = Σ_t ⟨do_t, ∂o_t/∂γ⟩ +
⟨dht, ∂S_T/∂γ⟩, from chunk-local terms and two chunk-level scans.

Why not the scalar-gate gradient summed over the tokens: that sum is Σ_t (t+1)·a_t of the per-token terms a_t
= q-side − k-side, whose parts cancel pair by pair (a pair (s, u) enters at u with weight u+1 and at s with
−(s+1)), so their float32 round-off is weighted by absolute positions: up to 1.7e-4 of the gradient lost at
T = 1,000 and 4.8e-4 at 4,096 (H100). Here every weight is a distance inside one chunk or a chunk's length.

Chunk c (first token c0, length L, j = t − c0), α = exp(γ), S the state entering the chunk, D = ∂S/∂γ:

    S_t      = α^(j+1) S + Σ_{s≤t} α^(t−s) k_s v_sᵀ
    ∂S_t/∂γ  = α^(j+1) (D + (j+1) S) + Σ_{s≤t} (t−s) α^(t−s) k_s v_sᵀ
    ⟨do_t, ∂o_t/∂γ⟩ = scale · [α^(j+1) q_tᵀ (D + (j+1) S) do_t
                               + Σ_{s≤t} (t−s) α^(t−s) (q_t·k_s)(do_t·v_s)]
    next chunk: S' = α^L S + Σ_s α^(L−1−j_s) k_s v_sᵀ
                D' = α^L (D + L·S) + Σ_s (L−1−j_s) α^(L−1−j_s) k_s v_sᵀ

One program a (batch, head, block of V columns) walks the chunks in order with S and D in float32 registers
(the term splits over V: (q·k)(do·v) is a sum over v), so no per-chunk state is stored. Products of two inputs
(q·k, do·v) run in the inputs' dtype with float32 sums (bf16 products are exact in float32); products with S,
D or the float32 weights in tf32x3 (three tf32 products on the tensor cores, about float32's precision; plain
float32 dots on Hopper spill). D after the last chunk meets dht.

float32 inputs on CUDA take the same arithmetic in torch operators (gamma_grad_torch.py): on an H100 with
Triton 3.6 this kernel faulted on them (an illegal address, first at B1 T21 H1 K32 V16), where bf16 inputs ran
the whole accuracy grid. Triton's interpreter still runs it in float32 (the CPU tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from longscan.kernels.linear_attention.triton.gamma_grad_torch import g_gamma_grad_torch

CHUNK = 64


@triton.jit
def _gamma_grad_kernel(q, k, v, do, gam, h0, dht, out, T, H, scale, NV,
                       K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                       HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr):
    """One (batch·head, V block): out[bh, iv] = scale·Σ_t ⟨do_t, ∂o_t/∂γ⟩ + ⟨dht, ∂S_T/∂γ⟩ over its columns."""
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b, h = bh // H, bh % H
    rk = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    j = tl.arange(0, C)
    # a head that forgets everything (−inf) gets 0, the limit of a large finite decay (−inf·0 would be NaN)
    gm = tl.maximum(tl.load(gam + h).to(tl.float32), -1e4)
    S = tl.zeros([K, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]).to(tl.float32)
    D = tl.zeros([K, BV], dtype=tl.float32)
    jf = j.to(tl.float32)
    dist = tl.maximum(jf[:, None] - jf[None, :], 0.0)            # u − s on and below the diagonal, else 0
    weight = dist * tl.exp(gm * dist)                            # 0 on the diagonal and above
    at = tl.exp(gm * (jf + 1))                                   # α^(j+1)
    acc = tl.zeros([C], dtype=tl.float32)
    for t0 in range(0, T, C):
        t = t0 + j
        live = t < T
        row = (b * T + t).to(tl.int64) * H + h
        bq = tl.load(q + row[:, None] * K + rk[None, :], mask=live[:, None], other=0.0)
        bk = tl.load(k + row[:, None] * K + rk[None, :], mask=live[:, None], other=0.0)
        bv = tl.load(v + row[:, None] * V + rv[None, :], mask=live[:, None], other=0.0)
        bdo = tl.load(do + row[:, None] * V + rv[None, :], mask=live[:, None], other=0.0)
        qf = bq.to(tl.float32)
        dof = bdo.to(tl.float32)
        # inter: α^(j+1) q_t·(D + (j+1) S)·do_t
        qd = tl.dot(qf, D, input_precision=SPREC)
        qs = tl.dot(qf, S, input_precision=SPREC)
        acc += at * tl.sum((qd + (jf + 1)[:, None] * qs) * dof, 1)
        # intra: Σ_{s<u} (u−s) α^(u−s) (q_u·k_s)(do_u·v_s)
        qk = tl.dot(bq, tl.trans(bk), input_precision=PREC)
        dv_ = tl.dot(bdo, tl.trans(bv), input_precision=PREC)
        acc += tl.sum(qk * dv_ * weight, 1)
        # the next chunk's S and D
        L = tl.minimum(T - t0, C).to(tl.float32)
        to_end = tl.maximum(L - 1 - jf, 0.0)
        w_end = tl.exp(gm * to_end)
        vf = bv.to(tl.float32)
        kf = bk.to(tl.float32)
        local = tl.dot(tl.trans(kf * w_end[:, None]), vf, input_precision=SPREC)
        local_d = tl.dot(tl.trans(kf * (w_end * to_end)[:, None]), vf, input_precision=SPREC)
        aL = tl.exp(gm * L)
        D = aL * (D + L * S) + local_d
        S = aL * S + local
    total = scale * tl.sum(acc, 0)
    if HAS_DHT:
        total += tl.sum(tl.sum(tl.load(dht + bh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]).to(tl.float32)
                               * D, 1), 0)
    tl.store(out + bh * NV + iv, total)


def g_gamma_grad(q, k, v, g_gamma, scale: float, initial_state, do, dht) -> torch.Tensor:
    """dL/dg_gamma `[H]` float32 for o = chunk linear attention of (q, k, v) under the constant log decay
    g_gamma `[H]` from initial_state (or zeros), given the output's gradient do (q's dtype) and the final
    state's dht (or None)."""
    if q.is_cuda and q.dtype == torch.float32:   # the kernel faulted there (the module's docstring)
        return g_gamma_grad_torch(q, k, v, g_gamma, scale, initial_state, do, dht)
    return g_gamma_grad_kernel(q, k, v, g_gamma, scale, initial_state, do, dht)


def g_gamma_grad_kernel(q, k, v, g_gamma, scale: float, initial_state, do, dht) -> torch.Tensor:
    """g_gamma_grad by the kernel, whatever the device and dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:      # no token: the state leaves as it entered, whatever the decay
        return torch.zeros(H, device=q.device, dtype=torch.float32)
    BV = 16       # with K = 128 the smallest tiles spill least (ptxas, sm_90), and 1 x 65536 gets 8 programs a head
    NV = V // BV
    out = torch.empty(B * H, NV, device=q.device, dtype=torch.float32)
    q, k, v, do = (x.contiguous() for x in (q, k, v, do.to(q.dtype)))
    h0 = initial_state.contiguous() if initial_state is not None else q
    dht_ = dht.contiguous() if dht is not None else q
    _gamma_grad_kernel[(B * H, NV)](q, k, v, do, g_gamma.contiguous(), h0, dht_, out, T, H, scale, NV,
                                    K=K, V=V, BV=BV, C=CHUNK, HAS_H0=initial_state is not None,
                                    HAS_DHT=dht is not None, SPREC="tf32x3",
                                    PREC="tf32x3" if q.dtype == torch.float32 else "tf32", num_warps=8, num_stages=1)
    return out.view(B, H, NV).sum((0, 2))
