"""Chunked linear attention in plain torch: the CPU default and the backend behind every CPU test.

Inside a chunk of C tokens attention is quadratic (masked, decay-weighted); across chunks a float32
state carries the past (Lightning Attention-2's split). Gradients come from autograd over a recomputed
forward, which is exact and keeps this file short; the Triton backend has hand-written backward kernels.

Shapes: q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H]` or `[B, T, H, K]` or g_gamma `[H]` (log decays),
states `[B, H, K, V]` in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64          # chunk for scalar (or no) decay
CHUNK_PER_KEY = 32  # per-key gates build a [C, C, K] decay tensor per chunk, so use smaller chunks


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def log_gate(g, g_gamma, B, T, H, dtype, device) -> torch.Tensor | None:
    """Log gate as `[B, H, T, Kg]` with Kg = 1 (scalar kinds, broadcast over K) or K (per-key)."""
    if g_gamma is not None:
        return g_gamma.to(dtype).view(1, H, 1, 1).expand(B, H, T, 1)
    if g is None:
        return None
    if g.dim() == 3:
        return g.to(dtype).transpose(1, 2).unsqueeze(-1)
    return g.to(dtype).transpose(1, 2)


def _chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """`[B, H, T, D]` -> `[B, H, N, C, D]`, zero-padded at the end (zero k, v, g leave the state unchanged)."""
    B, H, T, D = x.shape
    pad = (-T) % C
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(B, H, -1, C, D)


def _segment_sums(gc: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """Σ_{s<r≤t} g_r for every (t, s) of each chunk, `[B,H,N,C,Kg]` -> `[B,H,N,C(t),C(s),Kg]` (0 for t ≤ s).

    Summed directly rather than as b_t - b_s: with a log gate of -inf (a full reset) both cumulative sums
    are -inf past it and their difference is NaN, while the direct sum is exact and never above 0.
    """
    after = causal.tril(-1)[..., None]                       # r > s, as [C(r), C(s), 1]
    terms = torch.where(after, gc.unsqueeze(4), 0.0)         # g_r where r > s: [B,H,N,C(r),C(s),Kg]
    return terms.cumsum(3)


def _forward(q, k, v, g, g_gamma, scale, h0):
    """Returns o `[B, T, H, V]` (compute dtype) and the final state."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q)
    gl = log_gate(g, g_gamma, B, T, H, dt, q.device)
    per_key = gl is not None and gl.shape[-1] > 1
    C = CHUNK_PER_KEY if per_key else CHUNK
    qc = _chunks(q.to(dt).transpose(1, 2), C)
    kc = _chunks(k.to(dt).transpose(1, 2), C)
    vc = _chunks(v.to(dt).transpose(1, 2), C)
    N = qc.shape[2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if gl is None:
        b = None
        attn = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0)
    else:
        gc = _chunks(gl, C)
        b = gc.cumsum(3)                                    # within-chunk cumulative log gate [B,H,N,C,Kg]
        diff = _segment_sums(gc, causal)                     # Σ_{s<r≤t} g_r: [B,H,N,C(t),C(s),Kg]
        decay = torch.where(causal[..., None], diff, float("-inf")).exp()
        if per_key:
            attn = torch.einsum("bhntk,bhnsk,bhntsk->bhnts", qc, kc, decay)
        else:
            attn = (qc @ kc.transpose(-1, -2)) * decay[..., 0]
    o = attn @ vc                                           # intra-chunk part [B,H,N,C,V]
    # Inter-chunk: the state entering each chunk, then its contribution q_t ⊙ exp(b_t) · S.
    S = h0.to(dt) if h0 is not None else q.new_zeros(B, H, K, V, dtype=dt)
    states = []
    for n in range(N):
        states.append(S)
        if b is None:
            S = S + kc[:, :, n].transpose(-1, -2) @ vc[:, :, n]
        else:
            last = b[:, :, n, -1]                                        # [B,H,Kg]
            k_dec = kc[:, :, n] * diff[:, :, n, -1].exp()                # exp(Σ_{s<r<C} g_r)
            S = last.exp().unsqueeze(-1) * S + k_dec.transpose(-1, -2) @ vc[:, :, n]
    Sn = torch.stack(states, dim=2)                                      # [B,H,N,K,V]
    q_dec = qc if b is None else qc * b.exp()
    o = (o + q_dec @ Sn) * scale
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o, S


def forward(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False):
    """-> (o `[B, T, H, V]` in q's dtype, final state `[B, H, K, V]` float32 or None)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = _forward(q, k, v, g, g_gamma, scale, initial_state)
    return o.to(q.dtype), (S if output_final_state else None)


def autograd_backward(fwd, q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True):
    """Gradients of any forward ``fwd(q, k, v, g, g_gamma, scale, h0) -> (o, S)`` by autograd.

    -> (dq, dk, dv, dg, dh0). dg has the shape of g (or of g_gamma; None without decay or when not
    need_dg, which also spares its computation); dh0 is
    `[B, H, K, V]` in the compute dtype even when initial_state is None (the gradient of a zero state).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q)
    gate = g_gamma if g_gamma is not None else g
    h0 = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=dt)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, h0)]
    gate_leaf = gate.detach().requires_grad_(need_dg) if gate is not None else None
    with torch.enable_grad():
        o, S = fwd(*leaves[:3], gate_leaf if g_gamma is None else None,
                   gate_leaf if g_gamma is not None else None, scale, leaves[3])
        outs, grads = [o], [do.to(o.dtype)]
        if dht is not None:
            outs.append(S)
            grads.append(dht.to(S.dtype))
        inputs = leaves + ([gate_leaf] if gate_leaf is not None and need_dg else [])
        res = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
    dq, dk, dv, dh0 = (torch.zeros_like(x) if r is None else r for r, x in zip(res[:4], leaves))
    dg = None
    if gate_leaf is not None and need_dg:
        dg = (res[4] if res[4] is not None else torch.zeros_like(gate_leaf)).to(gate.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0


def backward(q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True):
    """-> (dq, dk, dv, dg, dh0), see :func:`autograd_backward`."""
    return autograd_backward(_forward, q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg)


def segment_state(k, v, g=None, g_gamma=None):
    """A segment's state from zero and its total log decay.

    -> (S `[B, H, K, V]` float32, log_decay `[B, H, K]` float32) with S = Σ_t exp(A_T - A_t) ⊙ k_t v_tᵀ,
    log_decay = A_T = Σ_t g_t (zeros without decay).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = compute_dtype(k)
    gl = log_gate(g, g_gamma, B, T, H, dt, k.device)
    kt = k.to(dt).transpose(1, 2)
    vt = v.to(dt).transpose(1, 2)
    if gl is None:
        return kt.transpose(-1, -2) @ vt, k.new_zeros(B, H, K, dtype=dt)
    total = gl.sum(2)                                       # [B,H,Kg]
    # Σ_{r>t} g_r summed from the end (not A_T - A_t, which is NaN once a -inf gate makes both -inf).
    after = F.pad(gl[:, :, 1:], (0, 0, 0, 1)).flip(2).cumsum(2).flip(2)
    S = (kt * after.exp()).transpose(-1, -2) @ vt
    return S, total.expand(B, H, K).contiguous()


def _q_decayed(q, g, g_gamma, dt):
    """q_t ⊙ exp(A_t) as `[B, H, T, K]` (A the inclusive cumulative log gate of the segment)."""
    B, T, H, K = q.shape
    qt = q.to(dt).transpose(1, 2)
    gl = log_gate(g, g_gamma, B, T, H, dt, q.device)
    return qt if gl is None else qt * gl.cumsum(2).exp()


def add_prefix(o, q, g, g_gamma, scale, P):
    """o + scale · (q ⊙ exp(A))ᵀ P: the output correction for a segment entered with state P `[B,H,K,V]`."""
    dt = compute_dtype(q)
    corr = scale * (_q_decayed(q, g, g_gamma, dt) @ P.to(dt))      # [B,H,T,V]
    return (o.to(dt) + corr.transpose(1, 2)).to(o.dtype)


def prefix_grad(q, g, g_gamma, scale, do):
    """Gradient of the segment's outputs w.r.t. its entering state: scale · Σ_t (q_t ⊙ exp(A_t)) do_tᵀ."""
    dt = compute_dtype(q)
    return scale * (_q_decayed(q, g, g_gamma, dt).transpose(-1, -2) @ do.to(dt).transpose(1, 2))
