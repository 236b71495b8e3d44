"""RoPE in Triton: one pass forward (x in, y out), one pass backward (dy in, dx out: the same kernel with the
rotation by -θ). Rows are (batch, token, head) triples; a program takes BLOCK_R rows, both halves of each, and
loads each row's cos/sin halves from the token's (and batch row's) table row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 2048   # elements of one half-tile a program (BLOCK_R rows × BLOCK_D): 8 a thread at 8 warps, no spills
WARPS = 8


@triton.jit
def _rope_kernel(X, C, S, Y, R, T, H, HALF, sxb, sxt, sxh, sxd, scb, sct, scd, ssb, sst, ssd,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)   # (b · T + t) · H + h
    mr = rows < R
    h = rows % H
    t = (rows // H) % T
    b = rows // H // T
    d = tl.arange(0, BLOCK_D)
    mask = mr[:, None] & (d < HALF)[None, :]
    px = X + (b * sxb + t * sxt + h * sxh)[:, None] + d[None, :] * sxd
    pc = C + (b * scb + t * sct)[:, None] + d[None, :] * scd
    ps = S + (b * ssb + t * sst)[:, None] + d[None, :] * ssd
    x1 = tl.load(px, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(px + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(pc, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(pc + HALF * scd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(ps, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(ps + HALF * ssd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:   # the transpose of the rotation: [z1, z2] -> [z1 c1 + z2 s2, z2 c2 - z1 s1]
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    py = Y + rows[:, None] * (2 * HALF) + d[None, :]
    tl.store(py, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(py + HALF, y2.to(Y.dtype.element_ty), mask=mask)


def _table_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, dim) strides of a [T, D] or [Bt, T, D] table; 0 along a batch it is shared by."""
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1), t.stride(2)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    B, T, H, D = x.shape
    half = D // 2
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    R = B * T * H
    if R == 0:
        return y
    block_d = triton.next_power_of_2(half)
    block_r = max(1, TILE // block_d)
    _rope_kernel[(triton.cdiv(R, block_r),)](x, cos, sin, y, R, T, H, half, *x.stride(), *_table_strides(cos),
                                             *_table_strides(sin), BLOCK_R=block_r, BLOCK_D=block_d,
                                             BACKWARD=backward, num_warps=WARPS)
    return y


def forward(x, cos, sin):
    return _apply(x, cos, sin, backward=False)


def backward(grad, cos, sin):
    return _apply(grad, cos, sin, backward=True)
