"""Float64 reference softmax attention with an explicit mask.

Slow and simple on purpose: every score is materialised, the mask is a boolean matrix, and GQA is an
explicit head-index map. Tests compare every other path against this on the whole (unsharded) sequence.
"""
from __future__ import annotations

import torch


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, T, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"k heads ({k.shape[2]}) must divide q heads ({q.shape[2]})")


def naive_mask(t_q: int, t_k: int, causal: bool, device=None) -> torch.Tensor:
    """Boolean `[t_q, t_k]`, True where query i may attend key j (causal: diagonal-aligned, j <= i)."""
    if not causal:
        return torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    i = torch.arange(t_q, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    return j <= i


def document_mask(q_doc: torch.Tensor, k_doc: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean `[Tq, Tk]`: query i may attend key j when both lie in one document (and j <= i if causal).

    q_doc `[Tq]`, k_doc `[Tk]` are per-token document ids; causal is diagonal-aligned (Tq == Tk).
    """
    same = q_doc[:, None] == k_doc[None, :]
    return same & naive_mask(q_doc.shape[0], k_doc.shape[0], causal, q_doc.device)


def naive_attention(q, k, v, scale=None, causal=True, mask=None):
    """Softmax attention in float64.

    q `[B, Tq, Hq, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]`; query head h reads kv head h // (Hq/Hkv).
    ``mask`` (bool `[Tq, Tk]`, True = attend) overrides ``causal``. Rows with no allowed key give 0 and
    lse = -inf. Returns (o `[B, Tq, Hq, Dv]` float64, lse `[B, Hq, Tq]` float64). Differentiable.
    """
    _check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[2] // k.shape[2]
    kv_head = torch.arange(q.shape[2], device=q.device) // group   # explicit GQA map
    q64, k64, v64 = q.double(), k.double()[:, :, kv_head], v.double()[:, :, kv_head]
    s = torch.einsum("bihd,bjhd->bhij", q64, k64) * scale
    if mask is None:
        mask = naive_mask(q.shape[1], k.shape[1], causal, q.device)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                   # [B, Hq, Tq]
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(torch.float64).min))
    p = torch.nan_to_num(p, nan=0.0)                                   # fully masked rows
    o = torch.einsum("bhij,bjhd->bihd", p, v64)
    return o, lse


def naive_backward(do, q, k, v, o, lse, scale=None, causal=True, mask=None):
    """Gradients of one (q, k/v) block given the *final* o and lse of the rows, in float64.

    The block's probabilities are exp(s - lse) with the row's global lse, so the block gradients of all
    blocks of a row sum to the gradient of the whole row (the identity ring attention relies on).
    Returns (dq, dk, dv) float64, dk/dv summed back to the Hkv heads.
    """
    _check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    hq, hkv = q.shape[2], k.shape[2]
    kv_head = torch.arange(hq, device=q.device) // (hq // hkv)
    q64, k64, v64 = q.double(), k.double()[:, :, kv_head], v.double()[:, :, kv_head]
    do64, o64, lse64 = do.double(), o.double(), lse.double()
    s = torch.einsum("bihd,bjhd->bhij", q64, k64) * scale
    if mask is None:
        mask = naive_mask(q.shape[1], k.shape[1], causal, q.device)
    p = torch.where(mask, torch.exp(s - lse64[..., None]), torch.zeros((), dtype=torch.float64, device=q.device))
    dv_full = torch.einsum("bhij,bihd->bjhd", p, do64)
    dp = torch.einsum("bihd,bjhd->bhij", do64, v64)
    delta = (do64 * o64).sum(-1).transpose(1, 2)                       # [B, Hq, Tq]
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhij,bjhd->bihd", ds, k64) * scale
    dk_full = torch.einsum("bhij,bihd->bjhd", ds, q64) * scale
    b, tk = k.shape[:2]
    # Sum the Hq/Hkv query heads of each group back onto their kv head.
    dk = dk_full.view(b, tk, hkv, hq // hkv, -1).sum(3)
    dv = dv_full.view(b, tk, hkv, hq // hkv, -1).sum(3)
    return dq, dk, dv
