"""path="wy", the serial stages: the state across chunks forward, its gradient backward; one program per
(block of V columns, sequence, head), the state `[K, BV]` held in float32 registers.

Forward, chunk n entered with S (b the cumulative log gate in the chunk, b_C its total):
    v_n = U_n - W_n S,     S ← exp(b_C) S + K̄_nᵀ v_n,     K̄_t = exp(b_C - b_t) k_t
writing S entering each chunk and v_n in the inputs' dtype (the output and backward stages read them).
Backward, chunk n in reverse with dS the gradient of the state leaving it:
    dv_n = dv_local_n + K̄_n dS,     dS ← exp(b_C) dS + scale Q̃_nᵀ do_n - W_nᵀ dv_n,     Q̃_t = exp(b_t) q_t
(dv_local = scale tril(Q̃K̂ᵀ)ᵀ do, from ``wy_grads``), writing dS leaving each chunk and dv_n.
Per-key gates take exp(b_C) a key (Diag(exp(b_C)) S) and read K̄ and Q̃ as ``wy_prep`` wrote them.
Each pass is column-wise in V: ``wy_state_forward_columns`` and ``wy_state_backward_columns`` run a block of
columns of V-wide buffers from (and to) a state of that block's width (the SP relay's blocks).
Products take the inputs' dtype as operands and accumulate in float32. The per-chunk states' offsets are
int64 (B·H·N·K·V passes 2³¹ at about 8M tokens × heads with K = V = 128), and so is each sequence's base
(B·T·H·K passes 2³¹ at about 16M tokens × heads with K = 128); offsets inside a sequence are int32
(``wy.wy_scan`` refuses T·H·max(K, V) ≥ 2³¹).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from longscan.kernels.delta_rule.triton.common import wy_sequence, wy_serial_chunk, wy_state_tile
from longscan.kernels.delta_rule.triton.wy_decay import BT, PER_KEY, SCALAR, gate_kind


@triton.jit
def _wy_state_fwd(K_, G, KB, GC, W, U, H0, HS, VN, HT, T, H, N, K, V, V0, VB, si_bh, si_k, si_v, so_bh, so_k, so_v,
                  GATE: tl.constexpr, HAS_H0: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1)
    # the sequence's int64 bases; int32 offsets inside it, formed in the loop (hoisted, they hold registers);
    # columns V0:V0 + VB of the V-wide U, HS and VN; the states H0 and HT `[B·H, K, VB]` by their strides
    oc, ok, ov, mk, mv, m_kv, seq, rows = wy_sequence(iv, bh, T, H, N, K, VB, KP, BV)
    dt = W.dtype.element_ty
    K_, W, U, VN, HS = K_ + seq * K, W + rows * K, U + rows * V + V0, VN + rows * V + V0, HS + V0
    if GATE == SCALAR:   # b `[B, H, N·BT]`, as ``wy_prep`` wrote it
        G = G + rows
    if GATE == PER_KEY:
        KB = KB + rows * K
    S = wy_state_tile(H0, bh, ok, ov, m_kv, si_bh, si_k, si_v, HAS_H0, KP, BV)
    for n in range(N):
        mt, tok, row, sn = wy_serial_chunk(n, oc, bh, T, H, N)
        tl.store(HS + (sn * K + ok[:, None]) * V + ov[None, :], S.to(dt), mask=m_kv)
        w = tl.load(W + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
        vn = tl.load(U + row[:, None] * V + ov[None, :], mask=mv[None, :], other=0.).to(tl.float32)
        vn -= tl.dot(w, S.to(dt), input_precision=PREC)
        tl.store(VN + row[:, None] * V + ov[None, :], vn.to(dt), mask=mv[None, :])
        if GATE == PER_KEY:   # K̄ = K ⊙ exp(b_C - b) as written by ``wy_prep``
            k = tl.load(KB + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
            S = S * tl.load(GC + sn * K + ok, mask=mk, other=0.)[:, None]
        else:
            k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=mt[:, None] & mk[None, :], other=0.).to(dt)
        if GATE == SCALAR:
            bc = tl.load(G + row)
            last = tl.load(G + n * BT + BT - 1)
            vn = vn * tl.exp(last - bc)[:, None]
            S = S * tl.exp(last)
        S += tl.dot(tl.trans(k), vn.to(dt), input_precision=PREC)
    tl.store(HT + bh.to(tl.int64) * so_bh + ok[:, None] * so_k + ov[None, :] * so_v, S, mask=m_kv)


@triton.jit
def _wy_state_bwd(Q, K_, G, QG, KB, GC, W, DO, DVL, DHT, DHS, DVN, DH0, T, H, N, K, V, V0, VB, si_bh, si_k, si_v,
                  so_bh, so_k, so_v, scale, GATE: tl.constexpr, HAS_Q: tl.constexpr, HAS_DHT: tl.constexpr,
                  KP: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, GATE_ROWS: tl.constexpr):
    """A scalar gate: G is g `[B, T, H]`, summed in each chunk here, and K̄, Q̃ `[BT, K]` are formed in registers;
    with GATE_ROWS G is b `[B, H, N·BT]` (``wy_prep``'s) and the products' `[BT, BV]` rows are scaled by the decays
    instead, so q and k reach the products as loaded (prefetched into shared memory as without a gate)."""
    iv, bh = tl.program_id(0), tl.program_id(1)
    # columns V0:V0 + VB of the V-wide DO, DVL, DHS and DVN; the states DHT and DH0 `[B·H, K, VB]` by their
    # strides
    oc, ok, ov, mk, mv, m_kv, seq, rows = wy_sequence(iv, bh, T, H, N, K, VB, KP, BV)
    dt = W.dtype.element_ty
    K_, W, DVN, DHS = K_ + seq * K, W + rows * K, DVN + rows * V + V0, DHS + V0
    if HAS_Q:   # without q (a segment transition) no output: no dv_local, no Q̃ᵀ do term
        Q, DO, DVL = Q + seq * K, DO + seq * V + V0, DVL + rows * V + V0
    if GATE == SCALAR:   # GATE_ROWS: b `[B, H, N·BT]` as ``wy_prep`` wrote it; else g `[B, T, H]`
        if GATE_ROWS:
            G = G + rows
        else:
            G = G + seq
    if GATE == PER_KEY:
        KB = KB + rows * K
        if HAS_Q:
            QG = QG + rows * K
    dS = wy_state_tile(DHT, bh, ok, ov, m_kv, si_bh, si_k, si_v, HAS_DHT, KP, BV)
    for i in range(N):
        n = N - 1 - i
        mt, tok, row, sn = wy_serial_chunk(n, oc, bh, T, H, N)
        m_tk = mt[:, None] & mk[None, :]
        tl.store(DHS + (sn * K + ok[:, None]) * V + ov[None, :], dS.to(dt), mask=m_kv)
        if GATE == PER_KEY:   # K̄ and Q̃ as written by ``wy_prep``
            k = tl.load(KB + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
            if HAS_Q:
                q = tl.load(QG + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
        else:
            k = tl.load(K_ + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(dt)
            if HAS_Q:
                q = tl.load(Q + tok[:, None] * K + ok[None, :], mask=m_tk, other=0.).to(dt)
        if GATE == SCALAR and GATE_ROWS:
            bc = tl.load(G + row)
            last = tl.load(G + n * BT + BT - 1)
        if GATE == SCALAR and not GATE_ROWS:   # K̄ and Q̃ formed in registers, back in the operands' dtype at once
            # (b summed here: read from memory, this variant spills when compiled without alignment hints)
            bc = tl.cumsum(tl.load(G + tok, mask=mt, other=0.).to(tl.float32), axis=0)
            last = tl.sum(tl.where(oc == BT - 1, bc, 0.), axis=0)
            k = (k * tl.exp(last - bc)[:, None]).to(dt)
            if HAS_Q:
                q = (q * tl.exp(bc)[:, None]).to(dt)
        kds = tl.dot(k, dS.to(dt), input_precision=PREC)
        if GATE == SCALAR and GATE_ROWS:   # K̄ dS = Diag(exp(b_C - b)) K dS: `[BT, BV]` rows, k as loaded
            kds = kds * tl.exp(last - bc)[:, None]
        if HAS_Q:
            dv = tl.load(DVL + row[:, None] * V + ov[None, :], mask=mv[None, :], other=0.).to(tl.float32) + kds
        else:
            dv = kds
        tl.store(DVN + row[:, None] * V + ov[None, :], dv.to(dt), mask=mv[None, :])
        w = tl.load(W + row[:, None] * K + ok[None, :], mask=mk[None, :], other=0.)
        if GATE == SCALAR:
            dS = dS * tl.exp(last)
        if GATE == PER_KEY:
            dS = dS * tl.load(GC + sn * K + ok, mask=mk, other=0.)[:, None]
        if HAS_Q:
            do = tl.load(DO + tok[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0.)
            if GATE == SCALAR and GATE_ROWS:   # Q̃ᵀ do = Qᵀ Diag(exp(b)) do: do's rows, q as loaded
                do = do.to(tl.float32) * tl.exp(bc)[:, None]
            dS += scale * tl.dot(tl.trans(q), do.to(dt), input_precision=PREC)
        dS -= tl.dot(tl.trans(w), dv.to(dt), input_precision=PREC)
    tl.store(DH0 + bh.to(tl.int64) * so_bh + ok[:, None] * so_k + ov[None, :] * so_v, dS, mask=m_kv)


def _kp(K: int) -> int:
    return max(16, triton.next_power_of_2(K))   # the whole state's keys in one block (tl.dot's least is 16)


def serial_block_v(block_v: Optional[int], VB: int, BH: int, gate: int, sms: int, gate_rows: bool = True) -> int:
    """V columns a program of the serial kernels for a launch over VB columns of BH sequences × heads on a GPU of
    ``sms`` SMs (0: no GPU). block_v as given, else the widest of 64 and 32 columns at which the launch still has a
    program for every SM, and 16 otherwise: each program's shared-memory prefetch of a chunk's `[64, K]` tiles
    (over 100 KB at K = 128) leaves room for one program an SM, so wider programs read those tiles fewer times in
    all while there are enough of them, and narrower ones run more of the chain side by side where there are not.
    16 on CPU (the interpreter) and for a scalar gate's backward without ``gate_rows`` (it forms K̄ and Q̃ in
    registers and spills at 32)."""
    if block_v is None:
        block_v = 16
        if sms > 0 and (gate_rows or gate != SCALAR.value):
            block_v = next((w for w in (64, 32) if BH * triton.cdiv(VB, w) >= sms), 16)
    return min(block_v, max(16, triton.next_power_of_2(VB)))


def serial_num_warps(num_warps: Optional[int], BV: int) -> int:
    """Warps a program of the serial kernels at BV columns: num_warps as given, else 8 at 64 columns (a thread then
    holds as much of the `[K, 64]` float32 state as 4 warps' threads do of `[K, 32]`; 4 spill there) and 4 below."""
    return num_warps if num_warps is not None else 8 if BV >= 64 else 4


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _merges(x: torch.Tensor) -> bool:
    """Whether a state's block x `[B, H, K, VB]` can be addressed as `[B·H, K, VB]` by strides (its B and H
    dimensions merge: contiguous states and the relay's V-major carries do)."""
    B, H = x.shape[:2]
    return B == 1 or H == 1 or x.stride(0) == H * x.stride(1)


def _strides(x: Optional[torch.Tensor]) -> tuple:
    """(sequence × head, key, column) strides of a state's block that ``_merges`` (None: unread, zeros)."""
    if x is None:
        return (0, 0, 0)
    return (x.stride(1) if x.shape[1] > 1 else x.stride(0), x.stride(2), x.stride(3))


def _entering(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An entering state's block as the kernels read it: itself where its B and H merge, else a contiguous copy."""
    return x if x is None or _merges(x) else x.contiguous()


def _leaving(out: Optional[torch.Tensor], B: int, H: int, K: int, VB: int, device, name: str) -> torch.Tensor:
    """The leaving state's block: ``out`` (float32 `[B, H, K, VB]` whose B and H merge) or a new one."""
    if out is None:
        return torch.empty(B, H, K, VB, device=device, dtype=torch.float32)
    if out.shape != (B, H, K, VB) or out.dtype != torch.float32 or not _merges(out):
        raise ValueError(f"{name} must be float32 {(B, H, K, VB)} with B and H mergeable (a view of `[B·H, K, VB]` "
                         f"by strides), got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    return out


def wy_state_forward_columns(k, g, KB, GC, W, U, h0, HS, VN, c0: int, c1: int, *, block_v: Optional[int],
                             num_warps: Optional[int], num_stages: int, precision: str,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The state pass on value columns c0:c1 alone (the pass is column-wise in V): reads U's columns, writes the
    states entering each chunk and v_n into those columns of HS `[B, H, N, K, V]` and VN `[B, H, N·BT, V]`
    (k's dtype, allocated by the caller), starting from h0 `[B, H, K, c1 - c0]` (None: zeros).
    -> the leaving state's columns `[B, H, K, c1 - c0]` float32, written into ``out`` where given. h0 and out may
    be strided views (the relay's V-major carries): any layout whose B and H dimensions merge."""
    B, T, H, K = k.shape
    V = U.shape[-1]
    N = U.shape[2] // 64
    VB = c1 - c0
    HT = _leaving(out, B, H, K, VB, k.device, "wy_state_forward_columns: out")
    h0 = _entering(h0)
    BV = serial_block_v(block_v, VB, B * H, gate_kind(g), _sms(k.device))
    _wy_state_fwd[(triton.cdiv(VB, BV), B * H)](
        k, g, KB, GC, W, U, h0, HS, VN, HT, T, H, N, K, V, c0, VB, *_strides(h0), *_strides(HT), GATE=gate_kind(g),
        HAS_H0=h0 is not None, KP=_kp(K), BV=BV, PREC=precision, num_warps=serial_num_warps(num_warps, BV),
        num_stages=num_stages)
    return HT


def wy_state_forward(k, g, KB, GC, W, U, h0, *, block_v: Optional[int], num_warps: Optional[int], num_stages: int,
                     precision: str):
    """-> (S entering each chunk `[B, H, N, K, V]` and v_n `[B, H, N·BT, V]` in k's dtype, S_T float32)."""
    B, T, H, K = k.shape
    V = U.shape[-1]
    N = U.shape[2] // 64
    HS = torch.empty(B, H, N, K, V, device=k.device, dtype=k.dtype)
    VN = torch.empty_like(U)
    HT = wy_state_forward_columns(k, g, KB, GC, W, U, h0, HS, VN, 0, V, block_v=block_v, num_warps=num_warps,
                                  num_stages=num_stages, precision=precision)
    return HS, VN, HT


def wy_state_backward_columns(q, k, g, QG, KB, GC, W, dO, dv_local, dHT, DHS, DVN, c0: int, c1: int, scale: float, *,
                              block_v: Optional[int], num_warps: Optional[int], num_stages: int, precision: str,
                              gate_rows: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The serial backward on value columns c0:c1 alone: reads those columns of dO `[B, T, H, V]` and dv_local
    `[B, H, N·BT, V]`, writes them in DHS `[B, H, N, K, V]` and DVN `[B, H, N·BT, V]` (k's dtype, allocated by the
    caller), from dHT `[B, H, K, c1 - c0]` (None: zeros). -> dS_0's columns `[B, H, K, c1 - c0]` float32, written
    into ``out`` where given (dHT and out: any layout whose B and H dimensions merge).
    q None (a segment transition: no output): dO, QG and dv_local are None, and dS takes the states' share only."""
    B, T, H, K = k.shape
    V = DVN.shape[-1]
    N = W.shape[2] // 64
    VB = c1 - c0
    DH0 = _leaving(out, B, H, K, VB, k.device, "wy_state_backward_columns: out")
    dHT = _entering(dHT)
    BV = serial_block_v(block_v, VB, B * H, gate_kind(g), _sms(k.device), gate_rows)
    _wy_state_bwd[(triton.cdiv(VB, BV), B * H)](
        q, k, g, QG, KB, GC, W, dO, dv_local, dHT, DHS, DVN, DH0, T, H, N, K, V, c0, VB,
        *_strides(dHT), *_strides(DH0), scale, GATE=gate_kind(g), HAS_Q=q is not None,
        HAS_DHT=dHT is not None, KP=_kp(K), BV=BV, PREC=precision, GATE_ROWS=gate_rows,
        num_warps=serial_num_warps(num_warps, BV), num_stages=num_stages)
    return DH0


def wy_state_backward(q, k, g, QG, KB, GC, W, dO, dv_local, dHT, scale: float, *, V: int, block_v: Optional[int],
                      num_warps: Optional[int], num_stages: int, precision: str, gate_rows: bool):
    """-> (dS leaving each chunk `[B, H, N, K, V]` and dv_n `[B, H, N·BT, V]` in k's dtype, dS_0 float32).
    q None (a segment transition: no output): dO, QG and dv_local are None, and dS takes the states' share only."""
    B, T, H, K = k.shape
    N = W.shape[2] // 64
    DHS = torch.empty(B, H, N, K, V, device=k.device, dtype=k.dtype)
    DVN = torch.empty(B, H, N * 64, V, device=k.device, dtype=k.dtype)
    DH0 = wy_state_backward_columns(q, k, g, QG, KB, GC, W, dO, dv_local, dHT, DHS, DVN, 0, V, scale, block_v=block_v,
                                    num_warps=num_warps, num_stages=num_stages, precision=precision,
                                    gate_rows=gate_rows)
    return DHS, DVN, DH0
