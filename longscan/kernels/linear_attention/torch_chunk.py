"""Chunked linear attention in plain torch: the CPU default and the backend behind every CPU test.

Inside a chunk of C tokens attention is quadratic (masked, decay-weighted); across chunks a float32
state carries the past (Lightning Attention-2's split). Gradients come from autograd over a recomputed
forward, which is exact and keeps this file short; the Triton backend has hand-written backward kernels.

Shapes: q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H]` or `[B, T, H, K]` or g_gamma `[H]` (log decays),
states `[B, H, K, V]` in float32 (float64 for float64 inputs). A log gate may be -inf (a full reset: the
state forgets everything before that token); see :func:`_cumulative`.
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


def _cumulative(gl: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (A, resets): cumulative sums along dim of the log gate with its -inf entries (full resets) taken
    as 0, and of the resets. The decay from s to t (s ≤ t) is exp(A_t - A_s) when resets_t == resets_s and 0
    otherwise: A stays finite, so no (-inf) - (-inf) appears, and finite gates give the plain cumulative sum.
    """
    reset = gl == float("-inf")
    return torch.where(reset, 0.0, gl).cumsum(dim), reset.cumsum(dim)


def _decay_log(A_t: torch.Tensor, A_s: torch.Tensor | float, n_t: torch.Tensor, n_s: torch.Tensor | int,
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """log of the decay from s to t: A_t - A_s, or -inf where a reset lies between (or where not keep)."""
    live = n_t == n_s if keep is None else (n_t == n_s) & keep
    return torch.where(live, A_t - A_s, float("-inf"))


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
        b, nb = _cumulative(_chunks(gl, C), 3)             # within-chunk cumulative log gate [B,H,N,C,Kg]
        decay = _decay_log(b.unsqueeze(4), b.unsqueeze(3), nb.unsqueeze(4), nb.unsqueeze(3),
                           causal[..., None]).exp()          # exp(b_t - b_s): [B,H,N,C(t),C(s),Kg]
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
            last, n_last = b[:, :, n, -1:], nb[:, :, n, -1:]                  # [B,H,1,Kg]
            k_dec = kc[:, :, n] * _decay_log(last, b[:, :, n], n_last, nb[:, :, n]).exp()
            whole = _decay_log(last[:, :, 0], 0.0, n_last[:, :, 0], 0).exp()   # the chunk's decay [B,H,Kg]
            S = whole.unsqueeze(-1) * S + k_dec.transpose(-1, -2) @ vc[:, :, n]
    Sn = torch.stack(states, dim=2)                                      # [B,H,N,K,V]
    q_dec = qc if b is None else qc * _decay_log(b, 0.0, nb, 0).exp()
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
    A, n = _cumulative(gl, 2)                              # [B,H,T,Kg]
    S = (kt * _decay_log(A[:, :, -1:], A, n[:, :, -1:], n).exp()).transpose(-1, -2) @ vt
    total = _decay_log(A[:, :, -1], 0.0, n[:, :, -1], 0)   # [B,H,Kg]
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
