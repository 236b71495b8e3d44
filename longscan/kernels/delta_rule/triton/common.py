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
