"""The delta rule with the recurrence across chunks in Triton (forward and backward kernels).

The chunked algorithm of ``torch_chunk`` has two stages. The chunks' own quantities (the WY / UT
representation: W, U_0 from one triangular solve a chunk, tril(Q̃ K̂ᵀ), Q̃, K̄ and the chunk's total log
gate) are independent across chunks and stay batched torch (``torch_chunk._intra``, recomputed in the
backward). The recurrence across chunks is serial in the chunks, and is what these kernels run, one program
per (sequence, head, block of BLOCK_V columns) — columns of the state never mix:
    U_n = U_0n - W_n S_n,   o_n = scale (Q̃_n S_n + tril(Q̃K̂ᵀ)_n U_n),   S_{n+1} = exp(l_n) ⊙ S_n + K̄_nᵀ U_n
The forward keeps S_n (one state a chunk); the backward runs the chunks in reverse:
    dU = scale (Q̃K̂ᵀ)ᵀ do + K̄ dS_{n+1},     dS_n = exp(l_n) ⊙ dS_{n+1} + scale Q̃ᵀ do - Wᵀ dU,
    dW = -dU S_nᵀ, dQ̃ = scale do S_nᵀ, d(Q̃K̂ᵀ) = scale do Uᵀ, dK̄ = U dS_{n+1}ᵀ, dl = Σ_v exp(l) S_n dS_{n+1};
the sums over V are per block of V and added up in torch. Autograd carries these gradients through the
torch stage to q, k, v, β and g.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from longscan.kernels.delta_rule.torch_chunk import _chunks, _intra

CHUNK = 32   # tokens a chunk
BLOCK_V = 32   # V columns a program: at K = 128 the backward's float32 tiles then fit an H100's shared memory
NUM_WARPS = 8


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))   # tl.dot needs dimensions of at least 16


@triton.jit
def _inter_fwd(W, U0, QK, QT, KB, LAST, H0, O, HT, SN, N, C, K, V, scale,
               HAS_Q: tl.constexpr, HAS_H0: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    """GATE: 0 none, 1 scalar (LAST `[BH, N]`), 2 per key (LAST `[BH, N, K]`)."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    oc, ok = tl.arange(0, BC), tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mc, mk, mv = oc < C, ok < K, ov < V
    m_kv = mk[:, None] & mv[None, :]
    m_ck = mc[:, None] & mk[None, :]
    m_cv = mc[:, None] & mv[None, :]
    if HAS_H0:
        S = tl.load(H0 + bh * K * V + ok[:, None] * V + ov[None, :], mask=m_kv, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(N):
        row = bh * N + n
        tl.store(SN + row * K * V + ok[:, None] * V + ov[None, :], S, mask=m_kv)
        w = tl.load(W + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        u = tl.load(U0 + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        u = u - tl.dot(w, S, input_precision="ieee")
        if HAS_Q:
            qt = tl.load(QT + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
            qk = tl.load(QK + row * C * C + oc[:, None] * C + oc[None, :], mask=mc[:, None] & mc[None, :], other=0.)
            o = scale * (tl.dot(qt, S, input_precision="ieee") + tl.dot(qk, u, input_precision="ieee"))
            tl.store(O + row * C * V + oc[:, None] * V + ov[None, :], o, mask=m_cv)
        kb = tl.load(KB + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        if GATE == 1:
            S = S * tl.exp(tl.load(LAST + row))
        if GATE == 2:
            S = S * tl.exp(tl.load(LAST + row * K + ok, mask=mk, other=0.))[:, None]
        S = S + tl.dot(tl.trans(kb), u, input_precision="ieee")
    tl.store(HT + bh * K * V + ok[:, None] * V + ov[None, :], S, mask=m_kv)


@triton.jit
def _inter_bwd(W, U0, QK, QT, KB, LAST, SN, DO, DHT, DU0, DW, DQK, DQT, DKB, DLAST, DH0, N, C, K, V, scale,
               HAS_Q: tl.constexpr, HAS_DHT: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    """Per block of V columns: DU0 its columns; DW, DQK, DQT, DKB, DLAST this block's share `[NV, ...]`."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    BH = tl.num_programs(0)
    oc, ok = tl.arange(0, BC), tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mc, mk, mv = oc < C, ok < K, ov < V
    m_kv = mk[:, None] & mv[None, :]
    m_ck = mc[:, None] & mk[None, :]
    m_cv = mc[:, None] & mv[None, :]
    m_cc = mc[:, None] & mc[None, :]
    if HAS_DHT:
        dS = tl.load(DHT + bh * K * V + ok[:, None] * V + ov[None, :], mask=m_kv, other=0.).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(N):
        n = N - 1 - i
        row = bh * N + n
        part = iv * BH * N + row          # this block's share of a reduction over V
        S = tl.load(SN + row * K * V + ok[:, None] * V + ov[None, :], mask=m_kv, other=0.)
        w = tl.load(W + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        u = tl.load(U0 + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        u = u - tl.dot(w, S, input_precision="ieee")
        kb = tl.load(KB + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        du = tl.dot(kb, dS, input_precision="ieee")
        dS_in = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_Q:
            do = tl.load(DO + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.).to(tl.float32)
            qk = tl.load(QK + row * C * C + oc[:, None] * C + oc[None, :], mask=m_cc, other=0.)
            qt = tl.load(QT + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
            du += scale * tl.dot(tl.trans(qk), do, input_precision="ieee")
            dqt = scale * tl.dot(do, tl.trans(S), input_precision="ieee")
            dqk = scale * tl.dot(do, tl.trans(u), input_precision="ieee")
            tl.store(DQT + part * C * K + oc[:, None] * K + ok[None, :], dqt, mask=m_ck)
            tl.store(DQK + part * C * C + oc[:, None] * C + oc[None, :], dqk, mask=m_cc)
            dS_in = scale * tl.dot(tl.trans(qt), do, input_precision="ieee")
        dkb = tl.dot(u, tl.trans(dS), input_precision="ieee")
        tl.store(DKB + part * C * K + oc[:, None] * K + ok[None, :], dkb, mask=m_ck)
        if GATE == 1:
            e = tl.exp(tl.load(LAST + row))
            tl.store(DLAST + part, e * tl.sum(tl.sum(S * dS, axis=1), axis=0))
            dS = e * dS
        if GATE == 2:
            e = tl.exp(tl.load(LAST + row * K + ok, mask=mk, other=0.))
            tl.store(DLAST + part * K + ok, e * tl.sum(S * dS, axis=1), mask=mk)
            dS = e[:, None] * dS
        tl.store(DU0 + row * C * V + oc[:, None] * V + ov[None, :], du, mask=m_cv)
        tl.store(DW + part * C * K + oc[:, None] * K + ok[None, :], -tl.dot(du, tl.trans(S), input_precision="ieee"),
                 mask=m_ck)
        dS = dS + dS_in - tl.dot(tl.trans(w), du, input_precision="ieee")
    tl.store(DH0 + bh * K * V + ok[:, None] * V + ov[None, :], dS, mask=m_kv)


def _flat(x):
    return None if x is None else x.contiguous()


class InterChunk(torch.autograd.Function):
    """(W, U_0, tril(Q̃K̂ᵀ), Q̃, K̄, l, h0) `[B, H, N, ...]` -> (o `[B, H, N, C, V]` or None, S_N `[B, H, K, V]`)."""

    @staticmethod
    def forward(ctx, W, U0, QK, QT, KB, last, h0, scale):
        W, U0, QK, QT, KB, last = (_flat(x) for x in (W, U0, QK, QT, KB, last))
        B, H, N, C, K = W.shape
        V = U0.shape[-1]
        has_q, gate = QT is not None, 0 if last is None else (1 if last.shape[-1] == 1 else 2)
        BV = min(BLOCK_V, _pow2(V))
        grid = (B * H, triton.cdiv(V, BV))
        O = U0.new_empty(B, H, N, C, V) if has_q else None
        HT = U0.new_empty(B, H, K, V)
        SN = U0.new_empty(B, H, N, K, V)
        h0c = _flat(h0.to(U0.dtype)) if h0 is not None else None
        _inter_fwd[grid](W, U0, QK, QT, KB, last, h0c, O, HT, SN, N, C, K, V, scale, HAS_Q=has_q,
                         HAS_H0=h0 is not None, GATE=gate, BC=_pow2(C), BK=_pow2(K), BV=BV, num_warps=NUM_WARPS)
        ctx.save_for_backward(W, U0, QK, QT, KB, last, SN)
        ctx.scale, ctx.gate, ctx.has_h0, ctx.h0_dtype = scale, gate, h0 is not None, getattr(h0, "dtype", None)
        return O, HT

    @staticmethod
    def backward(ctx, dO, dHT):
        W, U0, QK, QT, KB, last, SN = ctx.saved_tensors
        B, H, N, C, K = W.shape
        V = U0.shape[-1]
        has_q = QT is not None
        BV = min(BLOCK_V, _pow2(V))
        NV = triton.cdiv(V, BV)
        new = U0.new_empty
        dU0 = new(B, H, N, C, V)
        dW, dKB = new(NV, B, H, N, C, K), new(NV, B, H, N, C, K)
        dQT, dQK = (new(NV, B, H, N, C, K), new(NV, B, H, N, C, C)) if has_q else (None, None)
        dL = new((NV,) + tuple(last.shape)) if last is not None else None
        dH0 = new(B, H, K, V)
        if has_q and dO is None:
            dO = torch.zeros_like(U0)
        _inter_bwd[(B * H, NV)](W, U0, QK, QT, KB, last, SN, _flat(dO) if has_q else None,
                                _flat(dHT) if dHT is not None else None, dU0, dW, dQK, dQT, dKB, dL, dH0,
                                N, C, K, V, ctx.scale, HAS_Q=has_q, HAS_DHT=dHT is not None, GATE=ctx.gate,
                                BC=_pow2(C), BK=_pow2(K), BV=BV, num_warps=NUM_WARPS)
        total = lambda x: x.sum(0) if x is not None else None  # noqa: E731  (the V blocks' shares)
        dh0 = dH0.to(ctx.h0_dtype) if ctx.has_h0 else None
        return total(dW), dU0, total(dQK), total(dQT), total(dKB), total(dL), dh0, None


def _scan(q, k, v, beta, g, scale, h0, chunk):
    """-> (o `[B, T, H, V]` float32 or None when q is None, final state `[B, H, K, V]` float32)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    if k.dtype == torch.float64:
        raise TypeError("backend='triton' computes in float32; for float64 inputs use backend='torch'")
    C = min(chunk, T)
    args = (_chunks(q.float(), C) if q is not None else None, _chunks(k.float(), C), _chunks(v.float(), C),
            _chunks(beta.float().unsqueeze(-1), C),
            _chunks((g.unsqueeze(-1) if g.dim() == 3 else g).float(), C) if g is not None else None)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args):
        W, U0, qk, q_tilde, k_bar, last = checkpoint(_intra, *args, use_reentrant=False)
    else:
        W, U0, qk, q_tilde, k_bar, last = _intra(*args)
    o, S = InterChunk.apply(W, U0, qk, q_tilde, k_bar, last, h0, scale)
    if o is not None:
        N = o.shape[2]
        o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o, S


def forward(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, chunk=CHUNK):
    """-> (o `[B, T, H, V]` in q's dtype, final state `[B, H, K, V]` float32 or None). Differentiable."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = _scan(q, k, v, beta, g, scale, initial_state, chunk)
    return o.to(q.dtype), (S if output_final_state else None)


def segment_transition(k, v, beta, g=None, chunk=CHUNK):
    """(S_loc `[B, H, K, V]`, M `[B, H, K, K]`) float32: S_out = M S_in + S_loc (see torch_chunk)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    v_aug = torch.cat([v.float(), v.new_zeros(B, T, H, K, dtype=torch.float32)], dim=-1)
    h0 = torch.cat([k.new_zeros(B, H, K, V, dtype=torch.float32),
                    torch.eye(K, dtype=torch.float32, device=k.device).expand(B, H, K, K)], dim=-1)
    _, S = _scan(None, k, v_aug, beta, g, 1.0, h0, chunk)
    return S[..., :V], S[..., V:]
