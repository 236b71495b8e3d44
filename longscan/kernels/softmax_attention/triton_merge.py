"""The merge of a block's partial attention into the running (out, lse), in one Triton pass.

What :func:`longscan.kernels.softmax_attention.merge_into` computes in torch (about ten passes over the
rows' `[D]` vectors: products, a cast, a sum and a copy back), this reads the running out and the block's
out once and writes out once: with m = max(lse, block_lse) (0 where both are -inf),
a = exp(lse - m), b = exp(block_lse - m): out = (a·out + b·block_out) / (a + b), lse = m + log(a + b).
Rows that have seen no key on either side (a + b = 0, packed documents) keep out = 0 and lse = -inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(out, lse, blk, blk_lse, R, H, D,
                  so_b, so_t, so_h, sl_b, sl_h, sb_b, sb_t, sb_h, sbl_b, sbl_h,
                  BR: tl.constexpr, BD: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    live = r < R
    old = tl.load(lse + b * sl_b + h * sl_h + r, mask=live, other=float("-inf"))
    new = tl.load(blk_lse + b * sbl_b + h * sbl_h + r, mask=live, other=float("-inf")).to(tl.float32)
    m = tl.maximum(old, new)
    m = tl.where(m == float("-inf"), 0.0, m)
    a, c = tl.exp(old - m), tl.exp(new - m)
    s = a + c
    seen = s > 0
    s = tl.where(seen, s, 1.0)                  # unseen rows: weights 0, lse -inf, no 0/0 on the way
    w_old, w_new = tl.where(seen, a / s, 0.0), tl.where(seen, c / s, 0.0)
    d = tl.arange(0, BD)
    tile = live[:, None] & (d[None, :] < D)
    rw, bw = r.to(tl.int64)[:, None], b.to(tl.int64)      # offsets past 2^31 elements at long lengths
    po = out + bw * so_b + rw * so_t + h * so_h + d[None, :]
    pb = blk + bw * sb_b + rw * sb_t + h * sb_h + d[None, :]
    acc = tl.load(po, mask=tile, other=0.0) * w_old[:, None] \
        + tl.load(pb, mask=tile, other=0.0).to(tl.float32) * w_new[:, None]
    tl.store(po, acc, mask=tile)
    tl.store(lse + b * sl_b + h * sl_h + r, tl.where(seen, m + tl.log(s), float("-inf")), mask=live)


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor,
               rows: slice = slice(None)) -> None:
    """In place: fold ``block_out`` `[B, R, H, D]` / ``block_lse`` `[B, H, R]` into rows ``rows`` of the
    float32 ``out`` `[B, T, H, D]` / ``lse`` `[B, H, T]` (the last dimension of each contiguous)."""
    o, l_ = out[:, rows], lse[:, :, rows]
    B, R, H, D = o.shape
    if block_out.shape != o.shape or block_lse.shape != l_.shape:
        raise ValueError(f"block of out {tuple(block_out.shape)} / lse {tuple(block_lse.shape)} does not match "
                         f"rows {rows} of out {tuple(out.shape)} / lse {tuple(lse.shape)}")
    if R == 0:
        return
    if block_out.stride(-1) != 1:
        block_out = block_out.contiguous()
    if block_lse.stride(-1) != 1:
        block_lse = block_lse.contiguous()
    BD = triton.next_power_of_2(D)
    BR = max(1, min(64, 8192 // BD))
    _merge_kernel[(triton.cdiv(R, BR), B * H)](
        o, l_, block_out, block_lse, R, H, D,
        o.stride(0), o.stride(1), o.stride(2), l_.stride(0), l_.stride(1),
        block_out.stride(0), block_out.stride(1), block_out.stride(2), block_lse.stride(0), block_lse.stride(1),
        BR=BR, BD=BD)
