"""SwiGLU's elementwise stage in Triton: one pass forward (a, b in, y out), one pass backward (a, b, dy in, da
and db out, silu recomputed). The tensors are flat: each program takes BLOCK consecutive elements."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048   # elements a program: 8 a thread at 8 warps, 16-byte loads in bf16
WARPS = 8


@triton.jit
def _fwd_kernel(A, B, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(A, B, DY, DA, DB, n, BLOCK: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    if NEED_DA:
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DA + offs, (dy * b * s * (1 + a * (1 - s))).to(DA.dtype.element_ty), mask=mask)
    if NEED_DB:
        tl.store(DB + offs, (dy * a * s).to(DB.dtype.element_ty), mask=mask)


def forward(a, b):
    y = torch.empty_like(a)
    n = a.numel()
    if n:
        _fwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK, num_warps=WARPS)
    return y


def backward(a, b, grad, need_da: bool, need_db: bool):
    n = a.numel()
    da = torch.empty_like(a) if need_da else None
    db = torch.empty_like(b) if need_db else None
    if n and (need_da or need_db):
        _bwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, grad, da if need_da else a, db if need_db else b, n,
                                              BLOCK=BLOCK, NEED_DA=need_da, NEED_DB=need_db, num_warps=WARPS)
    return da, db
