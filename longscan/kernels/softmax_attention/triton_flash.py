"""Flash attention in Triton: forward and backward, causal or full, GQA, with float32 logsumexp.

q `[B, T, Hq, D]`, k/v `[B, Tk, Hkv, D]` with Hq a multiple of Hkv. The two block-pair masks ring attention
needs: "full" (causal=False, every key visible) and "causal diagonal" (causal=True, q and k of equal length,
query i sees keys ≤ i). Softmax in base 2 (exp2 is one instruction); lse is returned in natural log.

Forward: one program per (q block, batch·q-head), online softmax over key blocks; the causal loop runs the
off-diagonal blocks without a mask and only the diagonal blocks with one, and the q blocks are launched last
first (the longest loops start first and the last programs to start are short: a shorter tail).
Backward (FlashAttention-2): delta = rowsum(o⊙do); one kernel per kv block accumulates dk, dv over the q
blocks of every q-head of its group (no atomics), another per q block accumulates dq. Each has its own launch
settings (BWD_CONFIG), and with the causal mask each masks only the blocks that straddle the diagonal. A dk/dv
launch too small to fill the GPU (a ring step's rectangle of a few key blocks) splits each group's q-heads into
parts, one program each, whose float32 sums are added after it (``dkdv_splits``).

Packed documents (DOCS): per-token document ids of q and k (non-decreasing) add "same document" to the mask,
and each tile visits only the blocks of the other side that hold one of its documents (the bounds come from
a binary search in a small kernel of their own). Of those, the whole blocks of a one-document tile's own
document that every row sees run without a mask, as the causal path's interior does; only the document's
edges and the diagonal are masked. A row that sees no key gives o = 0 and lse = -inf.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _fwd_inner(acc, l_i, m_i, bq, k, v, kv_row0, HKV_D, offs_m, lo, hi, Tk, qk_scale,
               D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
               qd=None, kdoc=None, DOCS: tl.constexpr = False):
    rd = tl.arange(0, D)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        kmask = offs_n < Tk
        ptr = (kv_row0 + offs_n.to(tl.int64))[:, None] * HKV_D + rd[None, :]
        bk = tl.load(k + ptr, mask=kmask[:, None], other=0.0)
        bv = tl.load(v + ptr, mask=kmask[:, None], other=0.0)
        s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale   # base-2 logits
        if DOCS:
            kd = tl.load(kdoc + offs_n, mask=kmask, other=-2)
            vis = kmask[None, :] & (qd[:, None] == kd[None, :])
            if MASK:
                vis = vis & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(vis, s, float("-inf"))
        elif MASK:
            s = tl.where((offs_m[:, None] >= offs_n[None, :]) & kmask[None, :], s, float("-inf"))
        else:
            s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if DOCS:
            # a row with no visible key so far: subtract 0, not -inf (exp2(-inf - -inf) is nan)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(bv.dtype), bv, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _doc_ranges(bounds, tile, STEP: tl.constexpr, lo_min, hi_max, f_lo_min, f_hi_max):
    """One tile's loop over the other side with packed documents -> (lo, u0, u1, hi), in blocks of STEP.

    [lo, u0) and [u1, hi) need the document mask; every row of the tile sees all of [u0, u1) (whole blocks of
    the tile's one document). ``bounds`` `[tiles, 4]` comes from :func:`_tile_bounds`; the causal mask
    narrows the loop to [lo_min, hi_max) and the unmasked blocks to [f_lo_min, f_hi_max)."""
    lo = tl.maximum(tl.load(bounds + 4 * tile) // STEP * STEP, lo_min)
    hi = tl.minimum(tl.load(bounds + 4 * tile + 1), hi_max)
    f_lo = tl.maximum(tl.load(bounds + 4 * tile + 2), f_lo_min)
    f_hi = tl.minimum(tl.load(bounds + 4 * tile + 3), f_hi_max)
    u0 = tl.minimum(tl.maximum(f_lo, lo), hi)
    u1 = tl.minimum(tl.maximum(f_hi, u0), hi)
    return lo, u0, u1, hi


@triton.jit
def _fwd_kernel(q, k, v, o, lse, T, Tk, HQ, HKV, G, qk_scale, qdoc, kdoc, bounds,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                DOCS: tl.constexpr):
    im = tl.program_id(0)
    if CAUSAL:
        im = tl.num_programs(0) - 1 - im      # as in dq: the last programs to start are the shortest
    bh = tl.program_id(1)
    b = bh // HQ
    hq = bh % HQ
    hkv = hq // G
    offs_m = im * BM + tl.arange(0, BM)
    rd = tl.arange(0, D)
    mmask = offs_m < T
    qrow = (b * T + offs_m).to(tl.int64) * HQ + hq
    bq = tl.load(q + qrow[:, None] * D + rd[None, :], mask=mmask[:, None], other=0.0)
    kv_row0 = (b * Tk).to(tl.int64)
    k_h = k + hkv * D
    v_h = v + hkv * D
    HKV_D = HKV * D
    acc = tl.zeros([BM, D], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    if DOCS:
        # only the keys of this tile's documents; the blocks every row sees are run without a mask
        qd = tl.load(qdoc + offs_m, mask=mmask, other=-1)
        if CAUSAL:   # keys below the tile's first row are seen by every row of it
            lo, u0, u1, hi = _doc_ranges(bounds, im, BN, 0, (im + 1) * BM,
                                         0, (im * BM) // BN * BN)
        else:
            lo, u0, u1, hi = _doc_ranges(bounds, im, BN, 0, Tk, 0, Tk)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, bq, k_h, v_h, kv_row0, HKV_D, offs_m, lo, u0, Tk, qk_scale,
                                   D, BN, CAUSAL, PREC, qd, kdoc, True)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, bq, k_h, v_h, kv_row0, HKV_D, offs_m, u0, u1, Tk, qk_scale,
                                   D, BN, False, PREC)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, bq, k_h, v_h, kv_row0, HKV_D, offs_m, u1, hi, Tk, qk_scale,
                                   D, BN, CAUSAL, PREC, qd, kdoc, True)
        seen = l_i > 0
        acc = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse_row = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(o + qrow[:, None] * D + rd[None, :], acc.to(o.dtype.element_ty), mask=mmask[:, None])
        tl.store(lse + (bh.to(tl.int64) * T + offs_m), lse_row, mask=mmask)
    elif CAUSAL:
        # keys strictly below this q block need no mask; the diagonal blocks do
        full_hi = (im * BM) // BN * BN
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, bq, k_h, v_h, kv_row0, HKV_D, offs_m, 0, full_hi, Tk, qk_scale,
                                   D, BN, False, PREC)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, bq, k_h, v_h, kv_row0, HKV_D, offs_m, full_hi,
                                   tl.minimum((im + 1) * BM, Tk), Tk, qk_scale, D, BN, True, PREC)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, bq, k_h, v_h, kv_row0, HKV_D, offs_m, 0, Tk, Tk, qk_scale,
                                   D, BN, False, PREC)
    if not DOCS:
        acc = acc / l_i[:, None]
        tl.store(o + qrow[:, None] * D + rd[None, :], acc.to(o.dtype.element_ty), mask=mmask[:, None])
        tl.store(lse + (bh.to(tl.int64) * T + offs_m), (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mmask)


@triton.jit
def _delta_kernel(o, do, delta, T, HQ, D: tl.constexpr, BM: tl.constexpr):
    im = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    hq = bh % HQ
    offs_m = im * BM + tl.arange(0, BM)
    rd = tl.arange(0, D)
    mmask = offs_m < T
    row = (b * T + offs_m).to(tl.int64) * HQ + hq
    bo = tl.load(o + row[:, None] * D + rd[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
    bdo = tl.load(do + row[:, None] * D + rd[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
    tl.store(delta + bh.to(tl.int64) * T + offs_m, tl.sum(bo * bdo, 1), mask=mmask)


@triton.jit
def _bwd_dkdv_inner(dk_acc, dv_acc, bk, bv, q_h, do_h, lse_h, delta_h, q_row0, HQ_D, offs_n, lo, hi, T, qk_scale,
                    D: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
                    qdoc=None, kd=None, DOCS: tl.constexpr = False):
    """Add the q blocks [lo, hi) of one q-head to dk_acc, dv_acc `[BN, D]`. MASK: apply the causal mask.

    q rows past T need no mask: their q, do, lse, delta load as 0, so p = 1 but every term they add is
    p·do = 0 and ds·q = 0. Key rows past Tk only fill accumulator rows that are never stored."""
    rd = tl.arange(0, D)
    for m0 in range(lo, hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        mmask = offs_m < T
        ptr = (q_row0 + offs_m.to(tl.int64))[:, None] * HQ_D + rd[None, :]
        bq = tl.load(q_h + ptr, mask=mmask[:, None], other=0.0)
        bdo = tl.load(do_h + ptr, mask=mmask[:, None], other=0.0)
        l2 = tl.load(lse_h + offs_m, mask=mmask, other=0.0) * 1.4426950408889634
        dl = tl.load(delta_h + offs_m, mask=mmask, other=0.0)
        sT = tl.dot(bk, tl.trans(bq), input_precision=PREC)                  # [BN, BM]
        pT = tl.exp2(sT * qk_scale - l2[None, :])
        if DOCS:
            qd = tl.load(qdoc + offs_m, mask=mmask, other=-1)
            vis = kd[:, None] == qd[None, :]
            if MASK:
                vis = vis & (offs_n[:, None] <= offs_m[None, :])
            pT = tl.where(vis, pT, 0.0)
        elif MASK:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :], pT, 0.0)
        dv_acc += tl.dot(pT.to(bdo.dtype), bdo, input_precision=PREC)
        dpT = tl.dot(bv, tl.trans(bdo), input_precision=PREC)
        dsT = pT * (dpT - dl[None, :])
        dk_acc += tl.dot(dsT.to(bq.dtype), bq, input_precision=PREC)
    return dk_acc, dv_acc


@triton.jit
def _bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, T, Tk, HQ, HKV, G, S, sm_scale, qk_scale, qdoc, kdoc, bounds,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
                     PREC: tl.constexpr, DOCS: tl.constexpr):
    """One kv block of one kv head: dk, dv summed over all q rows of G // S of the G q-heads that share it
    (part s of S), stored as head hkv·S + s of dk, dv `[B, Tk, HKV·S, D]`."""
    jn = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // (HKV * S)
    hkv = (bh // S) % HKV
    part = bh % S
    offs_n = jn * BN + tl.arange(0, BN)
    rd = tl.arange(0, D)
    nmask = offs_n < Tk
    krow = (b * Tk + offs_n).to(tl.int64) * HKV + hkv
    orow = (b * Tk + offs_n).to(tl.int64) * (HKV * S) + hkv * S + part
    bk = tl.load(k + krow[:, None] * D + rd[None, :], mask=nmask[:, None], other=0.0)
    bv = tl.load(v + krow[:, None] * D + rd[None, :], mask=nmask[:, None], other=0.0)
    dk_acc = tl.zeros([BN, D], dtype=tl.float32)
    dv_acc = tl.zeros([BN, D], dtype=tl.float32)
    q_row0 = (b * T).to(tl.int64)
    HQ_D = HQ * D
    if DOCS:
        # only the queries of this key block's documents; the blocks that see every key run without a mask
        kd = tl.load(kdoc + offs_n, mask=nmask, other=-2)
        if CAUSAL:   # queries from the first q block past the block's last key see all of it
            lo, u0, u1, hi = _doc_ranges(bounds, jn, BM, (jn * BN) // BM * BM, T,
                                         tl.cdiv((jn + 1) * BN, BM) * BM, T)
        else:
            lo, u0, u1, hi = _doc_ranges(bounds, jn, BM, 0, T, 0, T)
    for gi in range(part * (G // S), (part + 1) * (G // S)):
        hq = hkv * G + gi
        q_h = q + hq * D
        do_h = do + hq * D
        lse_h = lse + (b * HQ + hq).to(tl.int64) * T
        delta_h = delta + (b * HQ + hq).to(tl.int64) * T
        if DOCS:
            dk_acc, dv_acc = _bwd_dkdv_inner(dk_acc, dv_acc, bk, bv, q_h, do_h, lse_h, delta_h, q_row0, HQ_D,
                                             offs_n, lo, u0, T, qk_scale, D, BM, CAUSAL, PREC, qdoc, kd, True)
            dk_acc, dv_acc = _bwd_dkdv_inner(dk_acc, dv_acc, bk, bv, q_h, do_h, lse_h, delta_h, q_row0, HQ_D,
                                             offs_n, u0, u1, T, qk_scale, D, BM, False, PREC)
            dk_acc, dv_acc = _bwd_dkdv_inner(dk_acc, dv_acc, bk, bv, q_h, do_h, lse_h, delta_h, q_row0, HQ_D,
                                             offs_n, u1, hi, T, qk_scale, D, BM, CAUSAL, PREC, qdoc, kd, True)
        elif CAUSAL:
            # q blocks that hold a row < the block's last key straddle the diagonal and need the mask;
            # every q block from diag_hi on sees all BN keys (q rows before lo see none)
            lo = (jn * BN) // BM * BM
            diag_hi = tl.cdiv((jn + 1) * BN, BM) * BM
            dk_acc, dv_acc = _bwd_dkdv_inner(dk_acc, dv_acc, bk, bv, q_h, do_h, lse_h, delta_h, q_row0, HQ_D,
                                             offs_n, lo, tl.minimum(diag_hi, T), T, qk_scale, D, BM, True, PREC)
            dk_acc, dv_acc = _bwd_dkdv_inner(dk_acc, dv_acc, bk, bv, q_h, do_h, lse_h, delta_h, q_row0, HQ_D,
                                             offs_n, diag_hi, T, T, qk_scale, D, BM, False, PREC)
        else:
            dk_acc, dv_acc = _bwd_dkdv_inner(dk_acc, dv_acc, bk, bv, q_h, do_h, lse_h, delta_h, q_row0, HQ_D,
                                             offs_n, 0, T, T, qk_scale, D, BM, False, PREC)
    tl.store(dk + orow[:, None] * D + rd[None, :], (dk_acc * sm_scale).to(dk.dtype.element_ty), mask=nmask[:, None])
    tl.store(dv + orow[:, None] * D + rd[None, :], dv_acc.to(dv.dtype.element_ty), mask=nmask[:, None])


@triton.jit
def _bwd_dq_inner(acc, bq, bdo, l2, dl, k_h, v_h, kv_row0, HKV_D, offs_m, lo, hi, Tk, qk_scale,
                  D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
                  qd=None, kdoc=None, DOCS: tl.constexpr = False):
    """Add the key blocks [lo, hi) to acc `[BM, D]`. MASK: 0 none, 1 causal, 2 keys < Tk.

    Keys past Tk load as 0 and add ds·k = 0, but their p = exp2(-l2) may overflow (then inf·0 = nan),
    so the full mask's partial last block masks them. The causal mask already drops them for every
    stored row (key > query); rows past T are never stored."""
    rd = tl.arange(0, D)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < Tk
        ptr = (kv_row0 + offs_n.to(tl.int64))[:, None] * HKV_D + rd[None, :]
        bk = tl.load(k_h + ptr, mask=nmask[:, None], other=0.0)
        bv = tl.load(v_h + ptr, mask=nmask[:, None], other=0.0)
        s = tl.dot(bq, tl.trans(bk), input_precision=PREC)
        p = tl.exp2(s * qk_scale - l2[:, None])
        if DOCS:
            kd = tl.load(kdoc + offs_n, mask=nmask, other=-2)
            vis = nmask[None, :] & (qd[:, None] == kd[None, :])
            if MASK == 1:
                vis = vis & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(vis, p, 0.0)
        elif MASK == 1:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        elif MASK == 2:
            p = tl.where(nmask[None, :], p, 0.0)
        dp = tl.dot(bdo, tl.trans(bv), input_precision=PREC)
        ds = p * (dp - dl[:, None])
        acc += tl.dot(ds.to(bk.dtype), bk, input_precision=PREC)
    return acc


@triton.jit
def _bwd_dq_kernel(q, k, v, do, lse, delta, dq, T, Tk, HQ, HKV, G, sm_scale, qk_scale, qdoc, kdoc, bounds,
                   D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
                   PREC: tl.constexpr, DOCS: tl.constexpr):
    """One q block of one q-head: dq over all keys it sees."""
    im = tl.program_id(0)
    if CAUSAL:
        im = tl.num_programs(0) - 1 - im      # the longest (last) q blocks start first: a shorter tail
    bh = tl.program_id(1)
    b = bh // HQ
    hq = bh % HQ
    hkv = hq // G
    offs_m = im * BM + tl.arange(0, BM)
    rd = tl.arange(0, D)
    mmask = offs_m < T
    qrow = (b * T + offs_m).to(tl.int64) * HQ + hq
    bq = tl.load(q + qrow[:, None] * D + rd[None, :], mask=mmask[:, None], other=0.0)
    bdo = tl.load(do + qrow[:, None] * D + rd[None, :], mask=mmask[:, None], other=0.0)
    stat = bh.to(tl.int64) * T + offs_m
    l2 = tl.load(lse + stat, mask=mmask, other=0.0) * 1.4426950408889634
    dl = tl.load(delta + stat, mask=mmask, other=0.0)
    kv_row0 = (b * Tk).to(tl.int64)
    k_h = k + hkv * D
    v_h = v + hkv * D
    HKV_D = HKV * D
    acc = tl.zeros([BM, D], dtype=tl.float32)
    if DOCS:
        qd = tl.load(qdoc + offs_m, mask=mmask, other=-1)
        if CAUSAL:   # keys below the tile's first row are seen by every row of it
            lo, u0, u1, hi = _doc_ranges(bounds, im, BN, 0, (im + 1) * BM,
                                         0, (im * BM) // BN * BN)
        else:
            lo, u0, u1, hi = _doc_ranges(bounds, im, BN, 0, Tk, 0, Tk)
        acc = _bwd_dq_inner(acc, bq, bdo, l2, dl, k_h, v_h, kv_row0, HKV_D, offs_m, lo, u0, Tk, qk_scale,
                            D, BN, 1 if CAUSAL else 0, PREC, qd, kdoc, True)
        acc = _bwd_dq_inner(acc, bq, bdo, l2, dl, k_h, v_h, kv_row0, HKV_D, offs_m, u0, u1, Tk, qk_scale,
                            D, BN, 0, PREC)
        acc = _bwd_dq_inner(acc, bq, bdo, l2, dl, k_h, v_h, kv_row0, HKV_D, offs_m, u1, hi, Tk, qk_scale,
                            D, BN, 1 if CAUSAL else 0, PREC, qd, kdoc, True)
    elif CAUSAL:
        # key blocks wholly at or below the block's first query need no mask; the rest straddle the diagonal
        full_hi = (im * BM) // BN * BN
        acc = _bwd_dq_inner(acc, bq, bdo, l2, dl, k_h, v_h, kv_row0, HKV_D, offs_m, 0, full_hi, Tk, qk_scale,
                            D, BN, 0, PREC)
        acc = _bwd_dq_inner(acc, bq, bdo, l2, dl, k_h, v_h, kv_row0, HKV_D, offs_m, full_hi,
                            tl.minimum((im + 1) * BM, Tk), Tk, qk_scale, D, BN, 1, PREC)
    else:
        n_full = Tk // BN * BN
        acc = _bwd_dq_inner(acc, bq, bdo, l2, dl, k_h, v_h, kv_row0, HKV_D, offs_m, 0, n_full, Tk, qk_scale,
                            D, BN, 0, PREC)
        acc = _bwd_dq_inner(acc, bq, bdo, l2, dl, k_h, v_h, kv_row0, HKV_D, offs_m, n_full, Tk, Tk, qk_scale,
                            D, BN, 2, PREC)
    tl.store(dq + qrow[:, None] * D + rd[None, :], (acc * sm_scale).to(dq.dtype.element_ty), mask=mmask[:, None])


def _check_docs(docs, T, Tk, device):
    if docs is None:
        return
    if docs.q.shape != (T,) or docs.k.shape != (Tk,):
        raise ValueError(f"document ids must be q [{T}] and k [{Tk}], got {tuple(docs.q.shape)} and "
                         f"{tuple(docs.k.shape)}")


def _doc_args(docs, T, Tk, device, tile, step):
    """-> (q ids, k ids, bounds) kernel arguments: int32 ids and, for each ``tile``-row tile of q, the
    :func:`_tile_bounds` of its keys in blocks of ``step``. Dummies when there are no documents."""
    if docs is None:
        z = torch.zeros(1, dtype=torch.int32, device=device)
        return z, z, z
    qd, kd = docs.q.to(device, torch.int32).contiguous(), docs.k.to(device, torch.int32).contiguous()
    return qd, kd, _tile_bounds(qd, kd, tile, step)


@triton.jit
def _bounds_kernel(a_doc, b_doc, bounds, n, m, iters, TILE: tl.constexpr, STEP: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`_tile_bounds` for BLOCK tiles a program: both searchsorteds as branchless binary searches."""
    tile = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = tile * TILE < n
    first = tl.load(a_doc + tile * TILE, mask=live, other=0)
    last = tl.load(a_doc + tl.minimum(tile * TILE + TILE - 1, n - 1), mask=live, other=0)
    # lo: the first index with b >= first; hi: the first with b > last; [base, base + length) still open
    lo, lo_len = tl.zeros([BLOCK], tl.int32), tl.full([BLOCK], 0, tl.int32) + m
    hi, hi_len = tl.zeros([BLOCK], tl.int32), tl.full([BLOCK], 0, tl.int32) + m
    for _ in range(iters):
        half = lo_len // 2
        go = (lo_len > 0) & (tl.load(b_doc + lo + half, mask=lo_len > 0, other=0) < first)
        lo, lo_len = tl.where(go, lo + half + 1, lo), tl.where(go, lo_len - half - 1, half)
        half = hi_len // 2
        go = (hi_len > 0) & (tl.load(b_doc + hi + half, mask=hi_len > 0, other=0) <= last)
        hi, hi_len = tl.where(go, hi + half + 1, hi), tl.where(go, hi_len - half - 1, half)
    one = first == last
    row = bounds + 4 * tile
    tl.store(row, lo, mask=live)
    tl.store(row + 1, hi, mask=live)
    tl.store(row + 2, tl.where(one, (lo + STEP - 1) // STEP * STEP, 0), mask=live)
    tl.store(row + 3, tl.where(one, hi // STEP * STEP, 0), mask=live)


def _tile_bounds(a_doc, b_doc, tile, step):
    """-> int32 `[tiles, 4]`: for each ``tile``-row tile of ``a_doc``, [lo, hi) the ``b_doc`` indices in the
    tile's documents, and [f_lo, f_hi) the whole ``step`` blocks of them in the tile's one document (empty
    when the tile holds more than one). One launch: a ring step's host time is mostly kernel launches, and
    the torch form of this took about fifteen."""
    n, m = a_doc.numel(), b_doc.numel()
    tiles = triton.cdiv(n, tile)
    out = torch.empty(tiles, 4, dtype=torch.int32, device=a_doc.device)
    _bounds_kernel[(triton.cdiv(tiles, 128),)](a_doc, b_doc, out, n, m, m.bit_length(), TILE=tile, STEP=step,
                                              BLOCK=128)
    return out


def _check(q, k, v, causal):
    if q.dtype not in _DTYPES:
        raise TypeError(f"triton flash attention supports {_DTYPES}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for x in (q, k, v):
        if x.device.type != "cuda" and not _interpreting():
            raise ValueError(f"triton flash attention needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q [B,T,Hq,D], k/v [B,Tk,Hkv,D] expected, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, T, HQ, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v must be [B={B}, Tk, Hkv, D={D}], got {tuple(k.shape)}")
    if D not in _DIMS:
        raise ValueError(f"triton flash attention supports head dims {_DIMS}, got D={D}")
    if HQ % k.shape[2]:
        raise ValueError(f"Hq={HQ} must be a multiple of Hkv={k.shape[2]}")
    if causal and k.shape[1] != T:
        raise ValueError(f"causal (diagonal) mask needs Tq == Tk, got {T} and {k.shape[1]}")


# Backward launch settings per kernel, 16-bit inputs on a GPU; picked by benchmarks/tuning/tune_flash.py on an H100
# (bf16, B=4, H=16, D=128, T=8192 and 16384, triton 3.6: backward 390-410 TFLOP/s; settings within ~5% of
# each other are noise there). Rerun it after a Triton upgrade. BM and BN: powers of two ≥ 16.
BWD_CONFIG = {
    "dkdv": dict(BM=64, BN=64, num_warps=4, num_stages=2),
    "dq": dict(BM=128, BN=64, num_warps=8, num_stages=3),
}
# float32 on a GPU (operands twice as large: small blocks) and the CPU interpreter (small blocks run faster)
BWD_CONFIG_FP32 = {
    "dkdv": dict(BM=32, BN=32, num_warps=8, num_stages=2),
    "dq": dict(BM=32, BN=32, num_warps=8, num_stages=2),
}
BWD_CONFIG_INTERPRET = {
    "dkdv": dict(BM=32, BN=32, num_warps=4, num_stages=1),
    "dq": dict(BM=32, BN=32, num_warps=4, num_stages=1),
}


# Forward launch settings: 16-bit inputs on a GPU, float32 on a GPU (small blocks), the CPU interpreter.
FWD_CONFIG = dict(BM=128, BN=64, num_warps=8, num_stages=3)
FWD_CONFIG_FP32 = dict(BM=64, BN=32, num_warps=8, num_stages=2)
FWD_CONFIG_INTERPRET = dict(BM=32, BN=32, num_warps=4, num_stages=1)


def _cfg(dtype):
    """Forward settings, a fresh dict read from the module's tables at each call."""
    if _interpreting():
        return dict(FWD_CONFIG_INTERPRET)
    return dict(FWD_CONFIG_FP32 if dtype == torch.float32 else FWD_CONFIG)


def _bwd_cfg(D, dtype):
    """-> (dk/dv settings, dq settings), fresh dicts read from the module's tables at each call."""
    table = BWD_CONFIG_INTERPRET if _interpreting() else BWD_CONFIG_FP32 if dtype == torch.float32 else BWD_CONFIG
    dkdv, dq = dict(table["dkdv"]), dict(table["dq"])
    if dtype == torch.float32 and D <= 64 and not _interpreting():
        dkdv["num_warps"] = dq["num_warps"] = 4
    return dkdv, dq


def _prec(x) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def flash_attn_forward(q, k, v, scale=None, causal=True, docs=None, out_dtype=None):
    """-> (o `[B, T, Hq, D]` in ``out_dtype`` (None: q's dtype), lse `[B, Hq, T]` float32, natural log).

    ``docs``: (q ids `[T]`, k ids `[Tk]`) non-decreasing document ids shared by the batch, or None.
    ``out_dtype=torch.float32`` writes o as the kernel holds it, for a caller that merges more blocks into it."""
    _check(q, k, v, causal)
    B, T, HQ, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    _check_docs(docs, T, Tk, q.device)
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty(q.shape, device=q.device, dtype=out_dtype or q.dtype)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    cfg = _cfg(q.dtype)
    BM, BN = cfg.pop("BM"), cfg.pop("BN")
    if docs is not None and Tk == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    _fwd_kernel[(triton.cdiv(T, BM), B * HQ)](q, k, v, o, lse, T, Tk, HQ, HKV, HQ // HKV, scale * _LOG2E,
                                              *_doc_args(docs, T, Tk, q.device, BM, BN),
                                              D=D, BM=BM, BN=BN, CAUSAL=causal, PREC=_prec(q),
                                              DOCS=docs is not None, **cfg)
    return o, lse


def dkdv_splits(n_programs: int, group: int, n_sm: int) -> int:
    """How many parts the dK/dV launch splits each GQA group of ``group`` q-heads into: 1 when its
    ``n_programs`` (kv blocks × batch × kv heads) already fill the ``n_sm`` multiprocessors twice over, else the
    fewest parts (a divisor of ``group``) that do, or ``group``. A small launch (a ring step's rectangle of a few
    key blocks) otherwise runs a few long programs, each looping over every q-head of its group."""
    for parts in range(1, group + 1):
        if group % parts == 0 and n_programs * parts >= 2 * n_sm:
            return parts
    return group


def _n_sm(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def flash_attn_backward(do, q, k, v, o, lse, scale=None, causal=True, docs=None, dq_dtype=None, dkv_dtype=None,
                        dkdv_parts=None):
    """-> (dq `[B, T, Hq, D]`, dk, dv `[B, Tk, Hkv, D]`) in the inputs' dtype, or dq in ``dq_dtype`` and dk, dv in
    ``dkv_dtype`` where given (float32: the kernels' sums as they hold them, for a caller that adds more blocks to
    them). o and lse are the rows' final values (for ring attention: after merging every block), so gradients of
    blocks add up.

    ``dkdv_parts``: how many parts each GQA group's q-heads are split into in the dK/dV kernel (a divisor of
    Hq // Hkv; the parts' float32 sums are added after it); None: :func:`dkdv_splits` for this launch."""
    _check(q, k, v, causal)
    B, T, HQ, D = q.shape
    Tk, HKV = k.shape[1], k.shape[2]
    _check_docs(docs, T, Tk, q.device)
    scale = D ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    do, o = do.contiguous().to(q.dtype), o.contiguous()
    lse = lse.contiguous().float()
    G = HQ // HKV
    if dkdv_parts is not None and (not isinstance(dkdv_parts, int) or dkdv_parts < 1 or G % dkdv_parts):
        raise ValueError(f"dkdv_parts must be a divisor of Hq // Hkv = {G}, got {dkdv_parts!r}")
    dq = torch.empty(q.shape, device=q.device, dtype=dq_dtype or q.dtype)
    if T == 0 or Tk == 0:
        return dq.zero_(), *(torch.zeros(x.shape, device=x.device, dtype=dkv_dtype or x.dtype) for x in (k, v))
    delta = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(T, 64), B * HQ)](o, do, delta, T, HQ, D=D, BM=64)
    cfg_kv, cfg_q = _bwd_cfg(D, q.dtype)
    BM, BN = cfg_kv.pop("BM"), cfg_kv.pop("BN")
    n_kv = triton.cdiv(Tk, BN)
    parts = dkdv_parts or dkdv_splits(n_kv * B * HKV, G, _n_sm(q.device))
    # with parts, each part's sums in float32, added below and rounded once
    dkv_dtype = dkv_dtype or k.dtype
    dk_p, dv_p = (torch.empty(B, Tk, HKV * parts, D, device=q.device,
                              dtype=torch.float32 if parts > 1 else dkv_dtype) for _ in range(2))
    dkv_docs = None if docs is None else type(docs)(docs.k, docs.q)   # tiles of k, bounds in q
    kd, qd, bounds = _doc_args(dkv_docs, Tk, T, q.device, BN, BM)
    _bwd_dkdv_kernel[(n_kv, B * HKV * parts)](q, k, v, do, lse, delta, dk_p, dv_p, T, Tk, HQ, HKV, G, parts, scale,
                                              scale * _LOG2E, qd, kd, bounds, D=D, BM=BM, BN=BN, CAUSAL=causal,
                                              PREC=_prec(q), DOCS=docs is not None, **cfg_kv)
    dk, dv = dk_p, dv_p
    if parts > 1:
        dk, dv = (x.view(B, Tk, HKV, parts, D).sum(3).to(dkv_dtype) for x in (dk_p, dv_p))
    args = (T, Tk, HQ, HKV, G, scale, scale * _LOG2E)
    BM, BN = cfg_q.pop("BM"), cfg_q.pop("BN")
    _bwd_dq_kernel[(triton.cdiv(T, BM), B * HQ)](q, k, v, do, lse, delta, dq, *args,
                                                 *_doc_args(docs, T, Tk, q.device, BM, BN), D=D, BM=BM, BN=BN,
                                                 CAUSAL=causal, PREC=_prec(q), DOCS=docs is not None, **cfg_q)
    return dq, dk, dv


__all__ = ["flash_attn_forward", "flash_attn_backward"]
