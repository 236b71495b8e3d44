"""The recurrence across chunks, forward and backward (one program per sequence, head and block of V columns).

Given every chunk's own quantities (W, U_0, tril(Q̃K̂ᵀ), Q̃, K̄ and its total log gate l, `[B, H, N, ...]`),
the chunks run in order, columns of the state never mixing:
    U_n = U_0n - W_n S_n,   o_n = scale (Q̃_n S_n + tril(Q̃K̂ᵀ)_n U_n),   S_{n+1} = exp(l_n) ⊙ S_n + K̄_nᵀ U_n
The forward keeps S_n (one state a chunk); the backward runs the chunks in reverse:
    dU = scale (Q̃K̂ᵀ)ᵀ do + K̄ dS_{n+1},     dS_n = exp(l_n) ⊙ dS_{n+1} + scale Q̃ᵀ do - Wᵀ dU,
    dW = -dU S_nᵀ, dQ̃ = scale do S_nᵀ, d(Q̃K̂ᵀ) = scale do Uᵀ, dK̄ = U dS_{n+1}ᵀ, dl = Σ_v exp(l) S_n dS_{n+1};
``_inter_bwd`` writes the sums over V (dW, dQ̃, dQK, dK̄, dl) as one share a block of V, added up by torch
(the torch intra path). The Triton intra path's backward runs ``_inter_bwd_states`` instead: dU and dS_{n+1}
alone, the sums over V then formed by the intra backward from S_n, dS_{n+1} and U (one state a chunk
written, instead of shares of `[C, K]` gradients a block of V).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from longscan.kernels.delta_rule.triton.common import (inter_key_blocks, inter_state_blocks,
                                                      inter_state_tile, inter_tiles)


def pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))   # tl.dot needs dimensions of at least 16


@triton.jit
def _inter_fwd(W, U0, QK, QT, KB, LAST, H0, O, HT, SN, N, C, K, V, scale,
               HAS_Q: tl.constexpr, HAS_H0: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """GATE: 0 none, 1 scalar (LAST `[BH, N]`), 2 per key (LAST `[BH, N, K]`). Writes the state entering
    each chunk (SN) for the backward."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    oc, ok, ov, mc, mk, mv, m_kv, m_ck, m_cv = inter_tiles(iv, C, K, V, BC, BK, BV)
    S = inter_state_tile(H0, bh, ok, ov, m_kv, K, V, HAS_H0, BK, BV)
    for n in range(N):
        row = bh * N + n
        tl.store(SN + row * K * V + ok[:, None] * V + ov[None, :], S, mask=m_kv)
        w = tl.load(W + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        u = tl.load(U0 + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        u = u - tl.dot(w, S, input_precision=PREC)
        if HAS_Q:
            qt = tl.load(QT + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
            qk = tl.load(QK + row * C * C + oc[:, None] * C + oc[None, :], mask=mc[:, None] & mc[None, :], other=0.)
            o = scale * (tl.dot(qt, S, input_precision=PREC) + tl.dot(qk, u, input_precision=PREC))
            tl.store(O + row * C * V + oc[:, None] * V + ov[None, :], o, mask=m_cv)
        kb = tl.load(KB + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        if GATE == 1:
            S = S * tl.exp(tl.load(LAST + row))
        if GATE == 2:
            S = S * tl.exp(tl.load(LAST + row * K + ok, mask=mk, other=0.))[:, None]
        S = S + tl.dot(tl.trans(kb), u, input_precision=PREC)
    tl.store(HT + bh * K * V + ok[:, None] * V + ov[None, :], S, mask=m_kv)


@triton.jit
def _inter_fwd_blocks(W, U0, QK, QT, KB, LAST, H0, O, HT, SN, N, C, K, V, scale,
               HAS_Q: tl.constexpr, HAS_H0: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, KS: tl.constexpr):
    """``_inter_fwd`` with the state and the chunk's `[C, K]` tiles are held as BK / KS blocks of
    KS keys (`[BK / KS, KS, BV]`, `[BK / KS, C, KS]`), so each product over K is a batch of products over KS
    keys summed, and no thread holds a whole row of K."""
    NKS: tl.constexpr = BK // KS
    bh, iv = tl.program_id(0), tl.program_id(1)
    oc, ov, mc, mv, ok, mk, o_kv, m_kv, o_ck, m_ck, m_cv = inter_key_blocks(iv, C, K, V, BC, BV, NKS, KS)
    S = inter_state_blocks(H0, bh, o_kv, m_kv, K, V, HAS_H0, NKS, KS, BV)
    for n in range(N):
        row = bh * N + n
        tl.store(SN + row * K * V + o_kv, S, mask=m_kv)
        w = tl.load(W + row * C * K + o_ck, mask=m_ck, other=0.)
        u = tl.load(U0 + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        u = u - tl.sum(tl.dot(w, S, input_precision=PREC), axis=0)
        if HAS_Q:
            qt = tl.load(QT + row * C * K + o_ck, mask=m_ck, other=0.)
            qk = tl.load(QK + row * C * C + oc[:, None] * C + oc[None, :], mask=mc[:, None] & mc[None, :], other=0.)
            o = scale * (tl.sum(tl.dot(qt, S, input_precision=PREC), axis=0) + tl.dot(qk, u, input_precision=PREC))
            tl.store(O + row * C * V + oc[:, None] * V + ov[None, :], o, mask=m_cv)
        kb = tl.load(KB + row * C * K + o_ck, mask=m_ck, other=0.)
        if GATE == 1:
            S = S * tl.exp(tl.load(LAST + row))
        if GATE == 2:
            S = S * tl.exp(tl.load(LAST + row * K + ok, mask=mk, other=0.))[:, :, None]
        S = S + tl.dot(tl.permute(kb, (0, 2, 1)), tl.broadcast_to(u[None, :, :], (NKS, BC, BV)),
                       input_precision=PREC)
    tl.store(HT + bh * K * V + o_kv, S, mask=m_kv)


@triton.jit
def _inter_bwd(W, U0, QK, QT, KB, LAST, SN, DO, DHT, DU0, DW, DQK, DQT, DKB, DLAST, DH0, N, C, K, V, scale,
               HAS_Q: tl.constexpr, HAS_DHT: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Per block of V columns: DU0 its columns; DW, DQK, DQT, DKB, DLAST this block's share `[NV, ...]`."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    BH = tl.num_programs(0)
    oc, ok, ov, mc, mk, mv, m_kv, m_ck, m_cv = inter_tiles(iv, C, K, V, BC, BK, BV)
    m_cc = mc[:, None] & mc[None, :]
    dS = inter_state_tile(DHT, bh, ok, ov, m_kv, K, V, HAS_DHT, BK, BV)
    for i in range(N):
        n = N - 1 - i
        row = bh * N + n
        part = iv * BH * N + row          # this block's share of a reduction over V
        S = tl.load(SN + row * K * V + ok[:, None] * V + ov[None, :], mask=m_kv, other=0.)
        w = tl.load(W + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        u = tl.load(U0 + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        u = u - tl.dot(w, S, input_precision=PREC)
        kb = tl.load(KB + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        du = tl.dot(kb, dS, input_precision=PREC)
        dS_in = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_Q:
            do = tl.load(DO + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.).to(tl.float32)
            qk = tl.load(QK + row * C * C + oc[:, None] * C + oc[None, :], mask=m_cc, other=0.)
            qt = tl.load(QT + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
            du += scale * tl.dot(tl.trans(qk), do, input_precision=PREC)
            dqt = scale * tl.dot(do, tl.trans(S), input_precision=PREC)
            dqk = scale * tl.dot(do, tl.trans(u), input_precision=PREC)
            tl.store(DQT + part * C * K + oc[:, None] * K + ok[None, :], dqt, mask=m_ck)
            tl.store(DQK + part * C * C + oc[:, None] * C + oc[None, :], dqk, mask=m_cc)
            dS_in = scale * tl.dot(tl.trans(qt), do, input_precision=PREC)
        dkb = tl.dot(u, tl.trans(dS), input_precision=PREC)
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
        tl.store(DW + part * C * K + oc[:, None] * K + ok[None, :], -tl.dot(du, tl.trans(S), input_precision=PREC),
                 mask=m_ck)
        dS = dS + dS_in - tl.dot(tl.trans(w), du, input_precision=PREC)
    tl.store(DH0 + bh * K * V + ok[:, None] * V + ov[None, :], dS, mask=m_kv)


@triton.jit
def _inter_bwd_states(W, U0, QK, QT, KB, LAST, SN, DO, DHT, DU0, DSN, UN, DH0, N, C, K, V, scale,
                      HAS_Q: tl.constexpr, HAS_DHT: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The backward's chunk-serial part alone: per block of V columns, dU, the gradient of the state leaving
    each chunk (DSN `[BH, N, K, V]`) and U (UN); the sums over V (dW, dQ̃, dK̄, dQK, dl) are left to the intra
    backward, which has every column of a chunk at once."""
    bh, iv = tl.program_id(0), tl.program_id(1)
    oc, ok, ov, mc, mk, mv, m_kv, m_ck, m_cv = inter_tiles(iv, C, K, V, BC, BK, BV)
    dS = inter_state_tile(DHT, bh, ok, ov, m_kv, K, V, HAS_DHT, BK, BV)
    for i in range(N):
        n = N - 1 - i
        row = bh * N + n
        tl.store(DSN + row * K * V + ok[:, None] * V + ov[None, :], dS, mask=m_kv)
        kb = tl.load(KB + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        du = tl.dot(kb, dS, input_precision=PREC)
        dS_in = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_Q:
            do = tl.load(DO + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.).to(tl.float32)
            qk = tl.load(QK + row * C * C + oc[:, None] * C + oc[None, :], mask=mc[:, None] & mc[None, :], other=0.)
            qt = tl.load(QT + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
            du += scale * tl.dot(tl.trans(qk), do, input_precision=PREC)
            dS_in = scale * tl.dot(tl.trans(qt), do, input_precision=PREC)
        if GATE == 1:
            dS = tl.exp(tl.load(LAST + row)) * dS
        if GATE == 2:
            dS = tl.exp(tl.load(LAST + row * K + ok, mask=mk, other=0.))[:, None] * dS
        tl.store(DU0 + row * C * V + oc[:, None] * V + ov[None, :], du, mask=m_cv)
        w = tl.load(W + row * C * K + oc[:, None] * K + ok[None, :], mask=m_ck, other=0.)
        S = tl.load(SN + row * K * V + ok[:, None] * V + ov[None, :], mask=m_kv, other=0.)
        u = tl.load(U0 + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        tl.store(UN + row * C * V + oc[:, None] * V + ov[None, :], u - tl.dot(w, S, input_precision=PREC), mask=m_cv)
        dS = dS + dS_in - tl.dot(tl.trans(w), du, input_precision=PREC)
    tl.store(DH0 + bh * K * V + ok[:, None] * V + ov[None, :], dS, mask=m_kv)


@triton.jit
def _inter_bwd_states_blocks(W, U0, QK, QT, KB, LAST, SN, DO, DHT, DU0, DSN, UN, DH0, N, C, K, V, scale,
                      HAS_Q: tl.constexpr, HAS_DHT: tl.constexpr, GATE: tl.constexpr, BC: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, KS: tl.constexpr):
    """``_inter_bwd_states`` in blocks of KS keys, as ``_inter_fwd_blocks``."""
    NKS: tl.constexpr = BK // KS
    bh, iv = tl.program_id(0), tl.program_id(1)
    oc, ov, mc, mv, ok, mk, o_kv, m_kv, o_ck, m_ck, m_cv = inter_key_blocks(iv, C, K, V, BC, BV, NKS, KS)
    dS = inter_state_blocks(DHT, bh, o_kv, m_kv, K, V, HAS_DHT, NKS, KS, BV)
    for i in range(N):
        n = N - 1 - i
        row = bh * N + n
        tl.store(DSN + row * K * V + o_kv, dS, mask=m_kv)
        kb = tl.load(KB + row * C * K + o_ck, mask=m_ck, other=0.)
        du = tl.sum(tl.dot(kb, dS, input_precision=PREC), axis=0)
        dS_in = tl.zeros([NKS, KS, BV], dtype=tl.float32)
        if HAS_Q:
            do = tl.load(DO + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.).to(tl.float32)
            qk = tl.load(QK + row * C * C + oc[:, None] * C + oc[None, :], mask=mc[:, None] & mc[None, :], other=0.)
            qt = tl.load(QT + row * C * K + o_ck, mask=m_ck, other=0.)
            du += scale * tl.dot(tl.trans(qk), do, input_precision=PREC)
            dS_in = scale * tl.dot(tl.permute(qt, (0, 2, 1)), tl.broadcast_to(do[None, :, :], (NKS, BC, BV)),
                                   input_precision=PREC)
        if GATE == 1:
            dS = tl.exp(tl.load(LAST + row)) * dS
        if GATE == 2:
            dS = tl.exp(tl.load(LAST + row * K + ok, mask=mk, other=0.))[:, :, None] * dS
        tl.store(DU0 + row * C * V + oc[:, None] * V + ov[None, :], du, mask=m_cv)
        w = tl.load(W + row * C * K + o_ck, mask=m_ck, other=0.)
        S = tl.load(SN + row * K * V + o_kv, mask=m_kv, other=0.)
        u = tl.load(U0 + row * C * V + oc[:, None] * V + ov[None, :], mask=m_cv, other=0.)
        tl.store(UN + row * C * V + oc[:, None] * V + ov[None, :],
                 u - tl.sum(tl.dot(w, S, input_precision=PREC), axis=0), mask=m_cv)
        dS = dS + dS_in - tl.dot(tl.permute(w, (0, 2, 1)), tl.broadcast_to(du[None, :, :], (NKS, BC, BV)),
                                 input_precision=PREC)
    tl.store(DH0 + bh * K * V + o_kv, dS, mask=m_kv)


def _key_step(block_k: int, K: int) -> int:
    """Keys a block of the recurrence's state and tiles (the blocked kernels)."""
    return min(block_k, pow2(K))


def _flat(x):
    return None if x is None else x.contiguous()


class Chunks(NamedTuple):
    """Every chunk's own quantities `[B, H, N, ...]`: W, U_0 `[C, K]`, `[C, V]`; tril(Q̃K̂ᵀ) `[C, C]` and Q̃
    `[C, K]` (None without q); K̄ `[C, K]`; the chunk's total log gate `[1]` or `[K]` (None without a gate)."""
    W: torch.Tensor
    U0: torch.Tensor
    QK: Optional[torch.Tensor]
    QT: Optional[torch.Tensor]
    KB: torch.Tensor
    last: Optional[torch.Tensor]


class InterGrads(NamedTuple):
    """The gradients of :class:`Chunks`' fields and of the initial state. dW, dQK, dQT, dKB and dlast are sums
    over V, kept as one share a block of V columns `[NV, B, H, N, ...]`; :meth:`total` sums them."""
    dW: torch.Tensor
    dU0: torch.Tensor
    dQK: Optional[torch.Tensor]
    dQT: Optional[torch.Tensor]
    dKB: torch.Tensor
    dlast: Optional[torch.Tensor]
    dh0: torch.Tensor

    def total(self) -> "InterGrads":
        add = lambda x: x.sum(0) if x is not None else None  # noqa: E731
        return InterGrads(add(self.dW), self.dU0, add(self.dQK), add(self.dQT), add(self.dKB), add(self.dlast),
                          self.dh0)


def _gate(last) -> int:
    return 0 if last is None else (1 if last.shape[-1] == 1 else 2)


def inter_forward(c: Chunks, h0, scale: float, *, block_v: int, num_warps: int, num_stages: int,
                  precision: str, block_k: Optional[int]):
    """-> (o `[B, H, N, C, V]` float32 or None without q, S_N `[B, H, K, V]`, S_n `[B, H, N, K, V]`), S_n the
    state entering chunk n."""
    W, U0, QK, QT, KB, last = (_flat(x) for x in c)
    B, H, N, C, K = W.shape
    V = U0.shape[-1]
    has_q = QT is not None
    BV = min(block_v, pow2(V))
    O = U0.new_empty(B, H, N, C, V) if has_q else None
    HT = U0.new_empty(B, H, K, V)
    SN = U0.new_empty(B, H, N, K, V)
    h0c = _flat(h0.to(U0.dtype)) if h0 is not None else None
    kernel, blocks = (_inter_fwd, {}) if block_k is None else (_inter_fwd_blocks, dict(KS=_key_step(block_k, K)))
    kernel[(B * H, triton.cdiv(V, BV))](W, U0, QK, QT, KB, last, h0c, O, HT, SN, N, C, K, V, scale,
                                        HAS_Q=has_q, HAS_H0=h0 is not None, GATE=_gate(last), BC=pow2(C),
                                        BK=pow2(K), BV=BV, PREC=precision, num_warps=num_warps,
                                        num_stages=num_stages, **blocks)
    return O, HT, SN


def inter_backward(c: Chunks, SN, dO, dHT, scale: float, *, block_v: int, num_warps: int, num_stages: int,
                   precision: str) -> InterGrads:
    """The gradients of the chunks' quantities (per block of V where they sum over V) and of the initial
    state, from those of o and S_N (either None)."""
    W, U0, QK, QT, KB, last = (_flat(x) for x in c)
    B, H, N, C, K = W.shape
    V = U0.shape[-1]
    has_q = QT is not None
    BV = min(block_v, pow2(V))
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
                            N, C, K, V, scale, HAS_Q=has_q, HAS_DHT=dHT is not None, GATE=_gate(last),
                            BC=pow2(C), BK=pow2(K), BV=BV, PREC=precision, num_warps=num_warps,
                            num_stages=num_stages)
    return InterGrads(dW, dU0, dQK, dQT, dKB, dL, dH0)


class StateGrads(NamedTuple):
    """What :func:`inter_backward_states` gives: dU_0 `[B, H, N, C, V]`, the gradient of the state leaving each
    chunk `[B, H, N, K, V]`, each chunk's U = U_0 - W S_n `[B, H, N, C, V]` (formed on the way, for the intra
    backward's sums over V), and the gradient of the initial state."""
    dU0: torch.Tensor
    dSN: torch.Tensor
    U: torch.Tensor
    dh0: torch.Tensor


def inter_backward_states(c: Chunks, SN, dO, dHT, scale: float, *, block_v: int, num_warps: int,
                          num_stages: int, precision: str, block_k: Optional[int]) -> StateGrads:
    """The recurrence's backward without its sums over V: see _inter_bwd_states."""
    W, U0, QK, QT, KB, last = (_flat(x) for x in c)
    B, H, N, C, K = W.shape
    V = U0.shape[-1]
    has_q = QT is not None
    BV = min(block_v, pow2(V))
    new = U0.new_empty
    dU0, dSN, UN, dH0 = new(B, H, N, C, V), new(B, H, N, K, V), new(B, H, N, C, V), new(B, H, K, V)
    kernel, blocks = ((_inter_bwd_states, {}) if block_k is None
                      else (_inter_bwd_states_blocks, dict(KS=_key_step(block_k, K))))
    kernel[(B * H, triton.cdiv(V, BV))](W, U0, QK, QT, KB, last, _flat(SN), _flat(dO) if has_q else None,
                                        _flat(dHT) if dHT is not None else None, dU0, dSN, UN, dH0,
                                        N, C, K, V, scale, HAS_Q=has_q, HAS_DHT=dHT is not None,
                                        GATE=_gate(last), BC=pow2(C), BK=pow2(K), BV=BV, PREC=precision,
                                        num_warps=num_warps, num_stages=num_stages, **blocks)
    return StateGrads(dU0, dSN, UN, dH0)


class InterChunk(torch.autograd.Function):
    """(W, U_0, tril(Q̃K̂ᵀ), Q̃, K̄, l, h0) `[B, H, N, ...]` -> (o `[B, H, N, C, V]` or None, S_N `[B, H, K, V]`):
    the recurrence across chunks alone, under autograd (the torch intra stage feeds it)."""

    @staticmethod
    def forward(ctx, W, U0, QK, QT, KB, last, h0, scale, block_v, num_warps, num_stages, precision, block_k):
        c = Chunks(*(_flat(x) for x in (W, U0, QK, QT, KB, last)))
        O, HT, SN = inter_forward(c, h0, scale, block_v=block_v, num_warps=num_warps, num_stages=num_stages,
                                  precision=precision, block_k=block_k)
        ctx.save_for_backward(*c, SN)
        ctx.scale, ctx.launch = scale, dict(block_v=block_v, num_warps=num_warps, num_stages=num_stages,
                                           precision=precision)
        ctx.has_h0, ctx.h0_dtype = h0 is not None, getattr(h0, "dtype", None)
        return O, HT

    @staticmethod
    def backward(ctx, dO, dHT):
        *c, SN = ctx.saved_tensors
        gr = inter_backward(Chunks(*c), SN, dO, dHT, ctx.scale, **ctx.launch).total()
        dh0 = gr.dh0.to(ctx.h0_dtype) if ctx.has_h0 else None
        return gr.dW, gr.dU0, gr.dQK, gr.dQT, gr.dKB, gr.dlast, dh0, None, None, None, None, None, None
