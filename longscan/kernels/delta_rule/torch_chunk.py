"""Chunked delta rule in plain torch (the CPU backend): the WY / UT representation within a chunk.

Inside a chunk of C tokens entered with state S_0, write b_t for the cumulative log gate (per key, or one
value broadcast over K) and Γ_t = Diag(exp(b_t)). The delta rule's updates u_t (S_t = D_t S_{t-1} + k_t u_tᵀ)
solve one unit lower-triangular system,
    (I + A) U = Diag(β) (V - K̃ S_0),      A_ts = β_t Σ_k k_tk k_sk exp(b_tk - b_sk)  (s < t),  K̃_t = Γ_t k_t,
so U = U_0 - W S_0 with U_0 = (I + A)⁻¹ Diag(β) V and W = (I + A)⁻¹ Diag(β) K̃. Then
    o   = scale · (Q̃ S_0 + tril(Q̃ K̂ᵀ) U),          Q̃_t = Γ_t q_t, (Q̃ K̂ᵀ)_ts = Σ_k q_tk k_sk exp(b_tk - b_sk)
    S_C = Γ_C S_0 + K̄ᵀ U,                          K̄_s = exp(b_C - b_s) ⊙ k_s.
Every decay factor is a difference b_t - b_s with s ≤ t (never a growing exp(-b)), so long chunks with
steep gates stay finite. Gradients come from autograd through this forward (exact: a triangular solve and
matmuls); the chunks' own quantities are recomputed in the backward rather than kept (activation
checkpointing), so what is kept grows like the inputs plus one state a chunk. The recurrence across
chunks is serial in Python.

A segment is an affine map of its entering state, S_out = M S_in + S_loc: :func:`segment_transition` runs
the same recurrence on [v | 0] from [0 | I] and reads (S_loc, M) off the two column blocks of the result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK = 32          # tokens a chunk (the triangular solve and the [C, C, K] per-key decays grow with C)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """`[B, T, H, ...]` -> `[B, H, N, C, ...]`, zero-padded at the end: a padded token has k = v = β = g = 0,
    so it leaves the state as it is (its output is cut off)."""
    x = x.movedim(1, 2)
    T = x.shape[2]
    pad = (-T) % C
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(x.shape[:2] + (-1, C) + tuple(x.shape[3:]))


DECAY_ELEMENTS = 1 << 26   # per-key decays `[C, C, K]` of at most this many elements exist at once


def _per_key_dot(a, k, b, causal):
    """Σ_k a_tk k_sk exp(b_tk - b_sk) for s ≤ t (zero above), `[B, H, N, C, C]`, over slices of the batch,
    head and chunk axes so that the `[.., C, C, K]` decays stay within DECAY_ELEMENTS."""
    B, H, N, C, K = a.shape
    flat = [x.reshape(B * H * N, C, K) for x in (a, k, b)]
    step = max(1, DECAY_ELEMENTS // (C * C * K))
    out = []
    for i in range(0, B * H * N, step):
        ai, ki, bi = (x[i:i + step] for x in flat)
        decay = (bi.unsqueeze(2) - bi.unsqueeze(1)).masked_fill(~causal[..., None], float("-inf")).exp()
        out.append(torch.einsum("ntk,nsk,ntsk->nts", ai, ki, decay))
    return torch.cat(out).view(B, H, N, C, C)


def _intra(qc, kc, vc, bc, gc):
    """Every chunk's own quantities at once, chunked inputs `[B, H, N, C, ...]` (qc, gc may be None) ->
    (W, U_0, tril(Q̃ K̂ᵀ) or None, Q̃ or None, K̄, the chunk's total log gate `[B, H, N, Kg]` or None)."""
    C = kc.shape[3]
    causal = torch.ones(C, C, dtype=torch.bool, device=kc.device).tril()
    if gc is None:
        b = None
        kk = kc @ kc.transpose(-1, -2)                           # [B,H,N,C(t),C(s)]
        qk = qc @ kc.transpose(-1, -2) if qc is not None else None
        k_tilde, k_bar, q_tilde = kc, kc, qc
    else:
        b = gc.cumsum(3)                                         # [B,H,N,C,Kg]
        if b.shape[-1] > 1:
            kk = _per_key_dot(kc, kc, b, causal)
            qk = _per_key_dot(qc, kc, b, causal) if qc is not None else None
        else:
            decay = (b - b.transpose(-1, -2)).masked_fill(~causal, float("-inf")).exp()   # exp(b_t - b_s)
            kk = (kc @ kc.transpose(-1, -2)) * decay
            qk = (qc @ kc.transpose(-1, -2)) * decay if qc is not None else None
        k_tilde = kc * b.exp()
        k_bar = kc * (b[:, :, :, -1:] - b).exp()
        q_tilde = qc * b.exp() if qc is not None else None
    eye = torch.eye(C, dtype=kc.dtype, device=kc.device)
    lhs = eye + (bc * kk).masked_fill(~causal.tril(-1), 0)       # I + A, unit lower triangular
    rhs = bc * torch.cat([k_tilde, vc], dim=-1)                  # Diag(β) [K̃ | V]
    sol = torch.linalg.solve_triangular(lhs, rhs, upper=False, unitriangular=True)
    K = kc.shape[-1]
    if qk is not None:
        qk = qk.masked_fill(~causal, 0)
    return sol[..., :K], sol[..., K:], qk, q_tilde, k_bar, (b[:, :, :, -1] if b is not None else None)


def _scan(q, k, v, beta, g, scale, h0, chunk):
    """-> (o `[B, T, H, V]` compute dtype or None when q is None, final state `[B, H, K, V]`)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = compute_dtype(k)
    C = min(chunk, T)
    kc = _chunks(k.to(dt), C)                                    # [B,H,N,C,K]
    vc = _chunks(v.to(dt), C)
    bc = _chunks(beta.to(dt).unsqueeze(-1), C)                   # [B,H,N,C,1]
    qc = _chunks(q.to(dt), C) if q is not None else None
    gc = _chunks((g.unsqueeze(-1) if g.dim() == 3 else g).to(dt), C) if g is not None else None
    N = kc.shape[2]
    args = (qc, kc, vc, bc, gc)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args):
        # recomputed in the backward: the per-key decays `[C, C, K]` a chunk are never kept
        W, U0, qk, q_tilde, k_bar, last = checkpoint(_intra, *args, use_reentrant=False)
    else:
        W, U0, qk, q_tilde, k_bar, last = _intra(*args)
    S = h0.to(dt) if h0 is not None else k.new_zeros(B, H, K, V, dtype=dt)
    outs = []
    for n in range(N):
        U = U0[:, :, n] - W[:, :, n] @ S                          # [B,H,C,V]
        if qc is not None:
            outs.append(scale * (q_tilde[:, :, n] @ S + qk[:, :, n] @ U))
        S = (S if last is None else last[:, :, n].exp().unsqueeze(-1) * S) + k_bar[:, :, n].transpose(-1, -2) @ U
    o = None
    if qc is not None:
        o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o, S


def forward(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, chunk=CHUNK):
    """-> (o `[B, T, H, V]` in q's dtype, final state `[B, H, K, V]` (float32, float64 for float64) or None).
    Differentiable by autograd."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = _scan(q, k, v, beta, g, scale, initial_state, chunk)
    return o.to(q.dtype), (S if output_final_state else None)


def segment_transition(k, v, beta, g=None, chunk=CHUNK):
    """A segment as an affine map of its entering state: S_out = M S_in + S_loc.

    -> (S_loc `[B, H, K, V]`, M `[B, H, K, K]`) in the compute dtype, differentiable by autograd."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dt = compute_dtype(k)
    v_aug = torch.cat([v.to(dt), v.new_zeros(B, T, H, K, dtype=dt)], dim=-1)
    eye = torch.eye(K, dtype=dt, device=k.device).expand(B, H, K, K)
    h0 = torch.cat([k.new_zeros(B, H, K, V, dtype=dt), eye], dim=-1)
    _, S = _scan(None, k, v_aug, beta, g, 1.0, h0, chunk)
    return S[..., :V], S[..., V:]
