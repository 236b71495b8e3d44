"""The delta rule with the recurrence across chunks in Triton (forward and backward kernels).

The chunked algorithm of ``torch_chunk`` has two stages. The chunks' own quantities (the WY / UT
representation: W, U_0 from one triangular solve a chunk, tril(Q̃ K̂ᵀ), Q̃, K̄ and the chunk's total log
gate) are independent across chunks and stay batched torch (``torch_chunk._intra``, recomputed in the
backward). The recurrence across chunks is serial in the chunks; these kernels run it, split so that the serial
loop carries only the state and what each chunk computes from it runs for all chunks at once (a loop holding
every operand of a chunk spilled its registers). Columns of the state never mix, so the serial passes run one
program per (sequence, head, block of BLOCK_V columns):
    _fwd_states:  S_{n+1} = exp(l_n) ⊙ S_n + K̄_nᵀ U_n,  U_n = U_0n - W_n S_n   (S_n and U_n written per chunk)
    _fwd_output:  o_n = scale (Q̃_n S_n + tril(Q̃K̂ᵀ)_n U_n)                        (every chunk at once)
    _bwd_states:  dU_n = scale (Q̃K̂ᵀ)ᵀ do + K̄ dS_{n+1},  dS_n = exp(l_n) ⊙ dS_{n+1} + scale Q̃ᵀ do - Wᵀ dU
    _bwd_chunks:  dW = -dU S_nᵀ, dQ̃ = scale do S_nᵀ, d(Q̃K̂ᵀ) = scale do Uᵀ, dK̄ = U dS_{n+1}ᵀ,
                  dl = exp(l) Σ_v S_n dS_{n+1}                                     (every chunk at once)
Autograd carries these gradients through the torch stage to q, k, v, β and g. The matmuls take float32
operands in tf32 for bf16 / fp16 models and in full float32 ("ieee") for float32 ones.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from longscan.kernels.delta_rule.torch_chunk import _chunks, _intra

CHUNK = 32   # tokens a chunk
BLOCK_V = 32   # V columns a serial program: more programs for the serial passes (docs/benchmarks.md)
NUM_WARPS = 4


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))   # tl.dot needs dimensions of at least 16


@triton.jit
def _fwd_states(W, U0, KB, LAST, H0, U, HT, SN, N, C, K, V, HAS_H0: tl.constexpr, GATE: tl.constexpr,
                BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The serial pass, one program a (sequence·head, block of V columns): S_n into SN, U_n = U_0n - W_n S_n
    into U, the final state into HT. GATE: 0 none, 1 scalar (LAST `[BH, N]`), 2 per key (LAST `[BH, N, K]`)."""
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
        row = (bh * N + n).to(tl.int64)
        tl.store(SN + row * K * V + ok[:, None] * V + ov[None, :], S, mask=m_kv)
        w = tl.load(W + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        u = tl.load(U0 + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        u = u - tl.dot(w, S, input_precision=PREC)
        tl.store(U + row * C * V + oc[:, None] * V + ov[None, :], u, mask=m_cv)
        kb = tl.load(KB + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        if GATE == 1:
            S = S * tl.exp(tl.load(LAST + row))
        if GATE == 2:
            S = S * tl.exp(tl.load(LAST + row * K + ok, mask=mk, other=0.))[:, None]
        S = S + tl.dot(tl.trans(kb), u, input_precision=PREC)
    tl.store(HT + bh * K * V + ok[:, None] * V + ov[None, :], S, mask=m_kv)


@triton.jit
def _fwd_output(QT, QK, SN, U, O, C, K, V, scale, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr):
    """o_n = scale (Q̃_n S_n + tril(Q̃K̂ᵀ)_n U_n), one program a (chunk of a sequence·head, block of V columns):
    every chunk at once, the states being known."""
    row, iv = tl.program_id(0).to(tl.int64), tl.program_id(1)
    oc, ok = tl.arange(0, BC), tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mc, mk, mv = oc < C, ok < K, ov < V
    S = tl.load(SN + row * K * V + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.)
    u = tl.load(U + row * C * V + oc[:, None] * V + ov[None, :], mask=mc[:, None] & mv[None, :], other=0.)
    qt = tl.load(QT + row * C * K + oc[:, None] * K + ok[None, :], mask=mc[:, None] & mk[None, :], other=0.)
    qk = tl.load(QK + row * C * C + oc[:, None] * C + oc[None, :], mask=mc[:, None] & mc[None, :], other=0.)
    o = scale * (tl.dot(qt, S, input_precision=PREC) + tl.dot(qk, u, input_precision=PREC))
    tl.store(O + row * C * V + oc[:, None] * V + ov[None, :], o, mask=mc[:, None] & mv[None, :])


@triton.jit
def _bwd_states(QK, QT, KB, W, LAST, DO, DHT, DU0, DSN, DH0, N, C, K, V, scale, HAS_Q: tl.constexpr,
                HAS_DHT: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr):
    """The serial pass of the backward, chunks in reverse, one program a (sequence·head, block of V columns):
    dS_{n+1} into DSN (row n), dU_n = scale (Q̃K̂ᵀ)ᵀ do + K̄ dS_{n+1} into DU0, the initial state's gradient
    into DH0; dS_n = exp(l_n) ⊙ dS_{n+1} + scale Q̃ᵀ do - Wᵀ dU."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    oc, ok = tl.arange(0, BC), tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mc, mk, mv = oc < C, ok < K, ov < V
    m_kv = mk[:, None] & mv[None, :]
    m_ck = mc[:, None] & mk[None, :]
    m_cv = mc[:, None] & mv[None, :]
    if HAS_DHT:
        dS = tl.load(DHT + bh * K * V + ok[:, None] * V + ov[None, :], mask=m_kv, other=0.).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(N):
        row = (bh * N + N - 1 - i).to(tl.int64)
        tl.store(DSN + row * K * V + ok[:, None] * V + ov[None, :], dS, mask=m_kv)
        kb = tl.load(KB + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        du = tl.dot(kb, dS, input_precision=PREC)
        if GATE == 1:
            dS = dS * tl.exp(tl.load(LAST + row))
        if GATE == 2:
            dS = dS * tl.exp(tl.load(LAST + row * K + ok, mask=mk, other=0.))[:, None]
        if HAS_Q:
            do = tl.load(DO + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.).to(tl.float32)
            qk = tl.load(QK + row * C * C + oc[:, None] * C + oc[None, :], mask=mc[:, None] & mc[None, :],
                         other=0.)
            du += scale * tl.dot(tl.trans(qk), do, input_precision=PREC)
            qt = tl.load(QT + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
            dS += scale * tl.dot(tl.trans(qt), do, input_precision=PREC)
        tl.store(DU0 + row * C * V + oc[:, None] * V + ov[None, :], du, mask=m_cv)
        w = tl.load(W + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        dS -= tl.dot(tl.trans(w), du, input_precision=PREC)
    tl.store(DH0 + bh * K * V + ok[:, None] * V + ov[None, :], dS, mask=m_kv)


@triton.jit
def _bwd_chunks(SN, DSN, U, DU0, DO, LAST, DW, DQK, DQT, DKB, DLAST, C, K, V, scale, HAS_Q: tl.constexpr,
                GATE: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Every chunk's own gradients at once, one program a chunk of a sequence·head, summing over blocks of V:
    dW = -dU S_nᵀ, dQ̃ = scale do S_nᵀ, d(Q̃K̂ᵀ) = scale do Uᵀ, dK̄ = U dS_{n+1}ᵀ, dl = exp(l) Σ_v S_n dS_{n+1}."""
    row = tl.program_id(0).to(tl.int64)
    oc, ok = tl.arange(0, BC), tl.arange(0, BK)
    mc, mk = oc < C, ok < K
    m_ck = mc[:, None] & mk[None, :]
    dw = tl.zeros([BC, BK], dtype=tl.float32)
    dkb = tl.zeros([BC, BK], dtype=tl.float32)
    dqt = tl.zeros([BC, BK], dtype=tl.float32)
    dqk = tl.zeros([BC, BC], dtype=tl.float32)
    dl = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < V
        m_kv = mk[:, None] & mv[None, :]
        m_cv = mc[:, None] & mv[None, :]
        S = tl.load(SN + row * K * V + ok[:, None] * V + ov[None, :], mask=m_kv, other=0.)
        dS = tl.load(DSN + row * K * V + ok[:, None] * V + ov[None, :], mask=m_kv, other=0.)
        u = tl.load(U + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        du = tl.load(DU0 + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        dw -= tl.dot(du, tl.trans(S), input_precision=PREC)
        dkb += tl.dot(u, tl.trans(dS), input_precision=PREC)
        if HAS_Q:
            do = tl.load(DO + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.).to(tl.float32)
            dqt += tl.dot(do, tl.trans(S), input_precision=PREC)
            dqk += tl.dot(do, tl.trans(u), input_precision=PREC)
        if GATE != 0:
            dl += tl.sum(S * dS, axis=1)
    tl.store(DW + row * C * K + oc[:, None] * K + ok[None, :], dw, mask=m_ck)
    tl.store(DKB + row * C * K + oc[:, None] * K + ok[None, :], dkb, mask=m_ck)
    if HAS_Q:
        tl.store(DQT + row * C * K + oc[:, None] * K + ok[None, :], scale * dqt, mask=m_ck)
        tl.store(DQK + row * C * C + oc[:, None] * C + oc[None, :], scale * dqk, mask=mc[:, None] & mc[None, :])
    if GATE == 1:
        tl.store(DLAST + row, tl.exp(tl.load(LAST + row)) * tl.sum(dl, axis=0))
    if GATE == 2:
        tl.store(DLAST + row * K + ok, tl.exp(tl.load(LAST + row * K + ok, mask=mk, other=0.)) * dl, mask=mk)


def _flat(x):
    return None if x is None else x.contiguous()


class InterChunk(torch.autograd.Function):
    """(W, U_0, tril(Q̃K̂ᵀ), Q̃, K̄, l, h0) `[B, H, N, ...]` -> (o `[B, H, N, C, V]` or None, S_N `[B, H, K, V]`).

    Each direction is a serial pass over the chunks that carries only the state (or its gradient), writing it
    for every chunk, and a pass over all chunks at once for what each chunk computes from it: the serial loop
    then holds a few tiles, not every operand of the chunk. ``precision``: Triton's input precision of the
    float32 matmuls ("tf32" for bf16 / fp16 models, whose operands carry fewer bits than tf32 keeps)."""

    @staticmethod
    def forward(ctx, W, U0, QK, QT, KB, last, h0, scale, precision):
        W, U0, QK, QT, KB, last = (_flat(x) for x in (W, U0, QK, QT, KB, last))
        B, H, N, C, K = W.shape
        V = U0.shape[-1]
        has_q, gate = QT is not None, 0 if last is None else (1 if last.shape[-1] == 1 else 2)
        BC, BK, BV = _pow2(C), _pow2(K), min(BLOCK_V, _pow2(V))
        HT = U0.new_empty(B, H, K, V)
        SN = U0.new_empty(B, H, N, K, V)
        U = torch.empty_like(U0)
        h0c = _flat(h0.to(U0.dtype)) if h0 is not None else None
        _fwd_states[(B * H, triton.cdiv(V, BV))](W, U0, KB, last, h0c, U, HT, SN, N, C, K, V,
                                                 HAS_H0=h0 is not None, GATE=gate, BC=BC, BK=BK, BV=BV,
                                                 PREC=precision, num_warps=NUM_WARPS)
        O = None
        if has_q:
            O = U0.new_empty(B, H, N, C, V)
            _fwd_output[(B * H * N, triton.cdiv(V, BV))](QT, QK, SN, U, O, C, K, V, scale, BC=BC, BK=BK, BV=BV,
                                                         PREC=precision, num_warps=NUM_WARPS)
        ctx.save_for_backward(W, QK, QT, KB, last, SN, U)
        ctx.scale, ctx.gate, ctx.precision = scale, gate, precision
        ctx.has_h0, ctx.h0_dtype = h0 is not None, getattr(h0, "dtype", None)
        return O, HT

    @staticmethod
    def backward(ctx, dO, dHT):
        W, QK, QT, KB, last, SN, U = ctx.saved_tensors
        B, H, N, C, K = W.shape
        V = U.shape[-1]
        has_q = QT is not None
        BC, BK, BV = _pow2(C), _pow2(K), min(BLOCK_V, _pow2(V))
        new = U.new_empty
        dU0, DSN, dH0 = new(B, H, N, C, V), torch.empty_like(SN), new(B, H, K, V)
        if has_q and dO is None:
            dO = torch.zeros_like(U)
        dO = _flat(dO) if has_q else None
        _bwd_states[(B * H, triton.cdiv(V, BV))](QK, QT, KB, W, last, dO, _flat(dHT) if dHT is not None else None,
                                                 dU0, DSN, dH0, N, C, K, V, ctx.scale, HAS_Q=has_q,
                                                 HAS_DHT=dHT is not None, GATE=ctx.gate, BC=BC, BK=BK, BV=BV,
                                                 PREC=ctx.precision, num_warps=NUM_WARPS)
        dW, dKB = torch.empty_like(W), torch.empty_like(KB)
        dQT, dQK = (torch.empty_like(QT), torch.empty_like(QK)) if has_q else (None, None)
        dL = torch.empty_like(last) if last is not None else None
        _bwd_chunks[(B * H * N,)](SN, DSN, U, dU0, dO, last, dW, dQK, dQT, dKB, dL, C, K, V, ctx.scale,
                                  HAS_Q=has_q, GATE=ctx.gate, BC=BC, BK=BK, BV=BV, PREC=ctx.precision,
                                  num_warps=NUM_WARPS)
        dh0 = dH0.to(ctx.h0_dtype) if ctx.has_h0 else None
        return dW, dU0, dQK, dQT, dKB, dL, dh0, None, None


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
    o, S = InterChunk.apply(W, U0, qk, q_tilde, k_bar, last, h0, scale,
                          "ieee" if k.dtype == torch.float32 else "tf32")
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
