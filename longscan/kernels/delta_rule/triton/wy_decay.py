"""path="wy", per-key gates (KDA): products inside a chunk that carry a decay per key,
    F_ts = Σ_k x_tk y_sk exp(b_tk - b_sk)      (s ≤ t, b the cumulative log gate in the chunk, `[BT, keys]`),
as tensor-core products without an exp that can overflow.

exp(b_t - b_s) is split at a reference row r_i, one for each of the chunk's four 16-row blocks i: row t of
block i takes exp(b_t - r_i), column s ≤ the block's last row takes exp(r_i - b_s), every other row and
column 0. r_i is the block's row 8 (its middle), so within the block each factor spans at most 8 tokens'
decay either way (finite in float32 for log decays down to about -10 a token), and for earlier blocks'
columns exp(r_i - b_s) ≤ 1. A row block's product then covers its diagonal block and every block left of
it; the four products' rows are disjoint and sum to F (entries with s > t inside a diagonal block are
finite and masked by the caller or multiplied by a zero of a lower-triangular operand).

The helpers take b and its four reference rows r0..r3 `[keys]`: ``refs`` takes them out of b in registers (the
kernel that sums g, ``_wy_kkt``), ``load_refs`` reads them from b as that kernel wrote it (every later kernel,
which so needs neither the sum over the chunk nor the reductions across rows).
"""
from __future__ import annotations

import triton
import triton.language as tl

BT: tl.constexpr = tl.constexpr(64)   # tokens a chunk: four diagonal blocks of 16 (tl.dot's smallest tile)
# the kernels' GATE: none, `[B, T, H]`, `[B, T, H, K]` (constexpr: read inside the kernels)
NO_GATE, SCALAR, PER_KEY = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


def gate_kind(g) -> int:
    """The kernels' GATE for g (None, `[B, T, H]` or `[B, T, H, K]`)."""
    return (NO_GATE if g is None else PER_KEY if g.dim() == 4 else SCALAR).value


@triton.jit
def refs(b, oc):
    """b's rows 8, 24, 40 and 56 (the four blocks' reference rows) `[keys]` each, from b `[BT, keys]` in registers."""
    r0 = tl.sum(tl.where((oc == 8)[:, None], b, 0.), axis=0)
    r1 = tl.sum(tl.where((oc == 24)[:, None], b, 0.), axis=0)
    r2 = tl.sum(tl.where((oc == 40)[:, None], b, 0.), axis=0)
    r3 = tl.sum(tl.where((oc == 56)[:, None], b, 0.), axis=0)
    return r0, r1, r2, r3


@triton.jit
def load_refs(B_, ok, mk, K):
    """The same rows read from a chunk's b `[BT, K]` float32 at B_ (keys ok, mask mk)."""
    r0 = tl.load(B_ + 8 * K + ok, mask=mk, other=0.)
    r1 = tl.load(B_ + 24 * K + ok, mask=mk, other=0.)
    r2 = tl.load(B_ + 40 * K + ok, mask=mk, other=0.)
    r3 = tl.load(B_ + 56 * K + ok, mask=mk, other=0.)
    return r0, r1, r2, r3


@triton.jit
def _block_factors(b, r0, r1, r2, r3, oc, i: tl.constexpr):
    """(exp(b_t - r_i) on block i's rows, exp(r_i - b_s) on columns s up to its last row), zero elsewhere."""
    if i == 0:
        r = r0
    elif i == 1:
        r = r1
    elif i == 2:
        r = r2
    else:
        r = r3
    rows = (oc // 16 == i)[:, None]
    cols = (oc < 16 * i + 16)[:, None]
    row_f = tl.where(rows, tl.exp(tl.where(rows, b - r[None, :], 0.)), 0.)
    col_f = tl.where(cols, tl.exp(tl.where(cols, r[None, :] - b, 0.)), 0.)
    return row_f, col_f


@triton.jit
def decayed_scores(x, y, b, r0, r1, r2, r3, oc, DT: tl.constexpr, PREC: tl.constexpr):
    """`[BT, BT]` F_ts = Σ_k x_tk y_sk exp(b_tk - b_sk), right for s ≤ t (x, y, b float32 `[BT, keys]`; r0..r3
    b's reference rows)."""
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i in tl.static_range(4):
        row_f, col_f = _block_factors(b, r0, r1, r2, r3, oc, i)
        acc += tl.dot((x * row_f).to(DT), tl.trans((y * col_f).to(DT)), input_precision=PREC)
    return acc


@triton.jit
def decayed_scores_pair(x, x2, y, b, r0, r1, r2, r3, oc, DT: tl.constexpr, PREC: tl.constexpr):
    """``decayed_scores`` of (x, y) and of (x2, y) from the same decay factors (per-key gates' K Kᵀ and Q Kᵀ)."""
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    acc2 = tl.zeros([BT, BT], dtype=tl.float32)
    for i in tl.static_range(4):
        row_f, col_f = _block_factors(b, r0, r1, r2, r3, oc, i)
        yc = tl.trans((y * col_f).to(DT))
        acc += tl.dot((x * row_f).to(DT), yc, input_precision=PREC)
        acc2 += tl.dot((x2 * row_f).to(DT), yc, input_precision=PREC)
    return acc, acc2


@triton.jit
def decayed_rows_cols(d, y, d2, x, b, r0, r1, r2, r3, oc, PREC: tl.constexpr):
    """`[BT, keys]` (Σ_s d_ts y_s exp(b_t - b_s), Σ_t d2_ts x_t exp(b_t - b_s)) for lower-triangular d, d2 `[BT, BT]`
    (in the operands' dtype) from one set of decay factors (y, x, b float32 `[BT, keys]`; r0..r3 b's reference
    rows)."""
    acc = tl.zeros_like(y)
    acc2 = tl.zeros_like(x)
    for i in tl.static_range(4):
        row_f, col_f = _block_factors(b, r0, r1, r2, r3, oc, i)
        acc += row_f * tl.dot(d, (y * col_f).to(d.dtype), input_precision=PREC)
        acc2 += col_f * tl.dot(tl.trans(d2), (x * row_f).to(d2.dtype), input_precision=PREC)
    return acc, acc2
