"""Shared `@triton.jit` helpers of the delta rule's kernels: the prologues that turn a program's ids into its
chunk's offsets and bases. Inlined where they are called."""
from __future__ import annotations

import triton
import triton.language as tl

from longscan.kernels.delta_rule.triton.wy_decay import BT, PER_KEY


@triton.jit
def wy_chunk(n, bh, T, H, N):
    """path="wy", chunk n of sequence × head bh -> (oc, mt, tok0, tok, row0): the chunk's token offsets `[BT]`,
    which of them lie inside the sequence, the int64 base of its first token in a `[B, T, H, ...]` input and
    the int32 token offsets from it (tok = oc·H), and the int64 base of its rows in a `[B, H, N·BT, ...]` chunk
    quantity (whose row offsets are oc)."""
    b, h = bh // H, bh % H
    oc = tl.arange(0, BT)
    t = n * BT + oc
    mt = t < T
    tok0 = ((b * T + n * BT) * H + h).to(tl.int64)   # int64 bases, int32 offsets in the chunk
    tok = oc * H
    row0 = ((bh * N + n) * BT).to(tl.int64)
    return oc, mt, tok0, tok, row0


@triton.jit
def gate_width(K, GATE: tl.constexpr):
    """Values a token of G (and of DB, DG): K for per-key gates, else 1."""
    gk = 1
    if GATE == PER_KEY:
        gk = K
    return gk


@triton.jit
def float32_chunk(n, bh, T, H, N, C, BC: tl.constexpr):
    """path="float32", chunk n (of C tokens, padded to BC) of sequence × head bh -> (oc, mc, mt, tok, row): the
    chunk's offsets `[BC]`, which lie in the chunk, which also in the sequence, the tokens' indices in a
    `[B, T, H]` input and the chunk's index in `[B, H, N]` chunk quantities."""
    b, h = bh // H, bh % H
    oc = tl.arange(0, BC)
    t = n * C + oc
    mc = oc < C
    mt = mc & (t < T)
    tok = (b * T + t) * H + h                                             # the token's index in [B, T, H]
    row = bh * N + n
    return oc, mc, mt, tok, row


@triton.jit
def wy_sequence(iv, bh, T, H, N, K, V, KP: tl.constexpr, BV: tl.constexpr):
    """path="wy"'s serial kernels, block iv of V columns of sequence × head bh -> (oc, ok, ov, mk, mv, m_kv, seq,
    rows): a chunk's token offsets `[BT]`, the keys `[KP]` and the block's columns `[BV]`, their masks and the
    state's `[KP, BV]` mask, the int64 bases of the sequence in a `[B, T, H, ...]` input and of its rows in a
    `[B, H, N·BT, ...]` chunk quantity."""
    b, h = bh // H, bh % H
    oc, ok = tl.arange(0, BT), tl.arange(0, KP)
    ov = iv * BV + tl.arange(0, BV)
    mk, mv = ok < K, ov < V
    m_kv = mk[:, None] & mv[None, :]
    seq, rows = (b * T * H + h).to(tl.int64), (bh * N * BT).to(tl.int64)
    return oc, ok, ov, mk, mv, m_kv, seq, rows


@triton.jit
def inter_tiles(iv, C, K, V, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """path="float32"'s recurrence, block iv of V columns -> (oc, ok, ov, mc, mk, mv, m_kv, m_ck, m_cv): a chunk's
    offsets `[BC]`, the keys `[BK]`, the block's columns `[BV]`, their masks and those of the `[K, V]` state, the
    `[C, K]` and the `[C, V]` tiles."""
    oc, ok = tl.arange(0, BC), tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mc, mk, mv = oc < C, ok < K, ov < V
    m_kv = mk[:, None] & mv[None, :]
    m_ck = mc[:, None] & mk[None, :]
    m_cv = mc[:, None] & mv[None, :]
    return oc, ok, ov, mc, mk, mv, m_kv, m_ck, m_cv


@triton.jit
def inter_key_blocks(iv, C, K, V, BC: tl.constexpr, BV: tl.constexpr, NKS: tl.constexpr, KS: tl.constexpr):
    """``inter_tiles`` with the keys in NKS blocks of KS -> (oc, ov, mc, mv, ok, mk, o_kv, m_kv, o_ck, m_ck, m_cv):
    ok `[NKS, KS]`, the state's offsets and mask `[NKS, KS, BV]`, the `[C, K]` tiles' `[NKS, C, KS]`."""
    oc = tl.arange(0, BC)
    ov = iv * BV + tl.arange(0, BV)
    mc, mv = oc < C, ov < V
    ok = tl.arange(0, NKS)[:, None] * KS + tl.arange(0, KS)[None, :]          # [NKS, KS]
    mk = ok < K
    o_kv = ok[:, :, None] * V + ov[None, None, :]
    m_kv = mk[:, :, None] & mv[None, None, :]
    o_ck = oc[None, :, None] * K + ok[:, None, :]                               # [NKS, C, KS]
    m_ck = mc[None, :, None] & mk[:, None, :]
    m_cv = mc[:, None] & mv[None, :]
    return oc, ov, mc, mv, ok, mk, o_kv, m_kv, o_ck, m_ck, m_cv


@triton.jit
def float32_grams(Q, K_, tok, mt, K, WITH_Q: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                  PREC: tl.constexpr):
    """path="float32", a chunk's K Kᵀ and (WITH_Q) Q Kᵀ `[BC, BC]` float32, summed over blocks of BK keys (no
    `[C, K]` tile held whole); Q Kᵀ stays zero without WITH_Q."""
    kk = tl.zeros([BC, BC], dtype=tl.float32)
    qk = tl.zeros([BC, BC], dtype=tl.float32)
    for ik in range(0, tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        m_tk = mt[:, None] & (ok < K)[None, :]
        k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(tl.float32)
        kk += tl.dot(k, tl.trans(k), input_precision=PREC)
        if WITH_Q:
            q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(tl.float32)
            qk += tl.dot(q, tl.trans(k), input_precision=PREC)
    return kk, qk


@triton.jit
def wy_state_tile(S0, bh, ok, ov, m_kv, s_bh, s_k, s_v, HAS: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr):
    """path="wy"'s serial kernels: the `[KP, BV]` float32 block of the state (or its gradient) S0 `[B·H, K, V]`
    (strides s_bh, s_k, s_v) of sequence × head bh that the chain starts from; zeros without HAS (S0 None)."""
    if HAS:
        S = tl.load(S0 + bh.to(tl.int64) * s_bh + ok[:, None] * s_k + ov[None, :] * s_v, mask=m_kv,
                    other=0.).to(tl.float32)
    else:
        S = tl.zeros([KP, BV], dtype=tl.float32)
    return S


@triton.jit
def wy_serial_chunk(n, oc, bh, T, H, N):
    """path="wy"'s serial kernels, chunk n -> (mt, tok, row, sn): which of its tokens lie in the sequence, their
    int32 offsets from the sequence's base, its rows' offsets from the sequence's rows and its int64 index in
    `[B, H, N, ...]`."""
    t = n * BT + oc
    mt = t < T
    tok = t * H
    row = n * BT + oc
    sn = (bh * N + n).to(tl.int64)
    return mt, tok, row, sn


@triton.jit
def inter_state_tile(S0, bh, ok, ov, m_kv, K, V, HAS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """path="float32"'s recurrence: the `[BK, BV]` float32 block of the state (or its gradient) S0 `[B, H, K, V]`
    of sequence × head bh that the chain starts from; zeros without HAS (S0 None)."""
    if HAS:
        S = tl.load(S0 + bh * K * V + ok[:, None] * V + ov[None, :], mask=m_kv, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    return S


@triton.jit
def inter_state_blocks(S0, bh, o_kv, m_kv, K, V, HAS: tl.constexpr, NKS: tl.constexpr, KS: tl.constexpr,
                       BV: tl.constexpr):
    """``inter_state_tile`` in NKS blocks of KS keys (o_kv, m_kv `[NKS, KS, BV]`, from ``inter_key_blocks``)."""
    if HAS:
        S = tl.load(S0 + bh * K * V + o_kv, mask=m_kv, other=0.).to(tl.float32)
    else:
        S = tl.zeros([NKS, KS, BV], dtype=tl.float32)
    return S
