"""RMSNorm in Triton: one pass forward (x in, y and 1/rms out), one pass backward (dx, and per-program partial
sums of dw that torch adds up). Rows are tokens × groups; a program handles BLOCK_M tokens of one group, so
each program's weight row is fixed."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PROGRAMS = 1024   # backward programs in all: enough to fill an H100/H200, few partial dw rows to add


@triton.jit
def _fwd_kernel(X, W, Y, R, M, N, G, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid, g = tl.program_id(0), tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mm, mn = offs_m < M, offs_n < N
    rows = offs_m.to(tl.int64) * G + g
    mask = mm[:, None] & mn[None, :]
    x = tl.load(X + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 1) / N + eps)
    w = tl.load(W + g * N + offs_n, mask=mn, other=0.0).to(tl.float32)
    y = x * r[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * N + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(R + rows, r, mask=mm)


@triton.jit
def _bwd_kernel(X, W, R, DY, DX, DWP, M, N, G, tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                NEED_DX: tl.constexpr, NEED_DW: tl.constexpr):
    pid, g = tl.program_id(0), tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    mn = offs_n < N
    w = tl.load(W + g * N + offs_n, mask=mn, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(tiles):
        offs_m = (pid * tiles + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        mm = offs_m < M
        rows = offs_m.to(tl.int64) * G + g
        mask = mm[:, None] & mn[None, :]
        ptr = rows[:, None] * N + offs_n[None, :]
        x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + ptr, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + rows, mask=mm, other=0.0)
        y = x * r[:, None]
        if NEED_DX:
            gy = dy * w[None, :]
            c = tl.sum(gy * y, 1) / N
            tl.store(DX + ptr, (r[:, None] * (gy - y * c[:, None])).to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            acc += dy * y
    if NEED_DW:
        tl.store(DWP + (pid * G + g).to(tl.int64) * N + offs_n, tl.sum(acc, 0), mask=mn)


def _blocks(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): a whole row per tile, about 4096 elements a tile."""
    block_n = triton.next_power_of_2(n)
    if block_n > 65536:
        raise ValueError(f"rms_norm: the Triton kernel takes rows of at most 65536 elements, got {n}")
    return max(1, 4096 // block_n), block_n, 8 if block_n >= 2048 else 4


def forward(x, weight, eps: float, out_dtype: torch.dtype, groups: int):
    N = x.shape[-1]
    M = x.numel() // (N * groups)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    r = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    BM, BN, warps = _blocks(N)
    if M:
        _fwd_kernel[(triton.cdiv(M, BM), groups)](x, weight, y, r, M, N, groups, eps, BLOCK_M=BM, BLOCK_N=BN,
                                                  num_warps=warps)
    return y, r


def backward(x, weight, r, grad, groups: int, need_dx: bool, need_dw: bool):
    N = x.shape[-1]
    M = x.numel() // (N * groups)
    BM, BN, warps = _blocks(N)
    n_tiles = triton.cdiv(M, BM)
    tiles = max(1, triton.cdiv(n_tiles, max(1, PROGRAMS // groups)))
    P = max(1, triton.cdiv(n_tiles, tiles))
    dx = torch.empty_like(x) if need_dx else None
    dwp = torch.zeros(P, groups, N, dtype=torch.float32, device=x.device) if need_dw else None
    if M:
        _bwd_kernel[(P, groups)](x, weight, r, grad, dx if need_dx else x, dwp if need_dw else r, M, N, groups,
                                 tiles, BLOCK_M=BM, BLOCK_N=BN, NEED_DX=need_dx, NEED_DW=need_dw,
                                 num_warps=warps)
    dw = dwp.sum(0).view(weight.shape).to(weight.dtype) if need_dw else None
    return dx, dw
