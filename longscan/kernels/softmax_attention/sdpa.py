"""Softmax attention blocks that return logsumexp: a plain torch path and torch's fused SDPA ops.

All functions take our layout q `[B, Tq, Hq, D]`, k/v `[B, Tk, Hkv, D]` and a mask mode:
"full" (every key) or "causal" (diagonal-aligned, Tq == Tk, key j visible to query i when j <= i).
They return (o, lse `[B, Hq, Tq]`) and, for backward, (dq, dk, dv) from (do, o, lse), where o and lse
may be the *final* merged values of the rows (ring attention), not the block's own.

- ``torch_forward``/``torch_backward``: any device, computes in float32 (float64 for float64 inputs).
  GQA folds the Hq/Hkv query heads of a group into the row dimension, so k/v are never copied per
  query head and dk/dv come out summed over the group by the matmul itself.
- ``flash_*`` / ``cudnn_*``: CUDA, fp16/bf16, ``torch.ops.aten._scaled_dot_product_{flash,cudnn}_attention``
  and their backward ops (both return the logsumexp). They take `[B, H, T, D]` and equal head counts, so
  k/v are expanded per query head for the call and dk/dv summed back to Hkv heads.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is computed and merged in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- plain torch (CPU default)

def _fold(q, k, v):
    """q -> `[B, Hkv, G·Tq, D]`, k/v -> `[B, Hkv, Tk, D]`, in the compute dtype."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    dt = compute_dtype(q.dtype)
    qf = q.to(dt).permute(0, 2, 1, 3).reshape(b, hkv, (hq // hkv) * tq, d)
    return qf, k.to(dt).transpose(1, 2), v.to(dt).transpose(1, 2)


def _scores(qf, kf, scale, causal, tq, docs=None):
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale             # [B, Hkv, G·Tq, Tk]
    row = torch.arange(qf.shape[-2], device=qf.device) % tq         # query position inside its head
    if causal:
        tk = kf.shape[-2]
        s = s.masked_fill(torch.arange(tk, device=qf.device)[None, :] > row[:, None], float("-inf"))
    if docs is not None:
        q_doc, k_doc = docs
        s = s.masked_fill(q_doc.to(qf.device)[row][:, None] != k_doc.to(qf.device)[None, :], float("-inf"))
    return s


def torch_forward(q, k, v, scale, causal, docs=None):
    """-> (o `[B, Tq, Hq, D]`, lse `[B, Hq, Tq]`), both in the compute dtype (float32/float64).

    ``docs``: (q_doc `[Tq]`, k_doc `[Tk]`) document ids; a key is visible only in the query's document.
    A row that sees no key gives o = 0 and lse = -inf."""
    b, tq, hq, _ = q.shape
    qf, kf, vf = _fold(q, k, v)
    s = _scores(qf, kf, scale, causal, tq, docs)
    lse = torch.logsumexp(s, dim=-1)                                 # [B, Hkv, G·Tq]
    # rows with no visible key: subtract 0 instead of -inf so their probabilities are 0, not nan
    safe = lse.masked_fill(torch.isinf(lse), 0.0) if docs is not None else lse
    o = torch.matmul(torch.exp(s - safe[..., None]), vf)             # [B, Hkv, G·Tq, Dv]
    return o.reshape(b, hq, tq, -1).transpose(1, 2), lse.reshape(b, hq, tq)


def torch_backward(do, q, k, v, o, lse, scale, causal, docs=None):
    """-> (dq, dk, dv) in the compute dtype; dk/dv already summed over each GQA group."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    qf, kf, vf = _fold(q, k, v)
    dof, of = (x.to(qf.dtype).permute(0, 2, 1, 3).reshape(b, hkv, -1, x.shape[-1]) for x in (do, o))
    lse_f = lse.to(qf.dtype).reshape(b, hkv, -1)
    if docs is not None:
        lse_f = lse_f.masked_fill(torch.isinf(lse_f), 0.0)          # rows that see no key: p = 0
    p = torch.exp(_scores(qf, kf, scale, causal, tq, docs) - lse_f[..., None])
    dv = torch.matmul(p.transpose(-1, -2), dof)                      # [B, Hkv, Tk, Dv]
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    delta = (dof * of).sum(-1, keepdim=True)                         # rowsum(do ⊙ o) of the final o
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq.reshape(b, hq, tq, d).transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------- torch fused SDPA ops (CUDA)

def _to_bhtd(q, k, v):
    """`[B, T, H, D]` -> `[B, H, T, D]`, k/v expanded to Hq heads (the fused ops need equal heads)."""
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if g > 1:
        kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
    return qt, kt, vt


def _from_bhtd_grads(dq, dk, dv, hkv):
    """Grads `[B, H, T, D]` -> `[B, T, H, D]`, dk/dv summed over each GQA group."""
    b, hq, tk, d = dk.shape
    if hq != hkv:
        dk = dk.view(b, hkv, hq // hkv, tk, d).sum(2)
        dv = dv.view(b, hkv, hq // hkv, tk, dv.shape[-1]).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _squeeze_lse(lse, b, h, t):
    # cuDNN returns the stats as [B, H, T, 1]; flash as [B, H, T].
    return lse.reshape(b, h, t).float()


def flash_forward(q, k, v, scale, causal):
    qt, kt, vt = _to_bhtd(q, k, v)
    out = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)
    o, lse = out[0], out[1]
    return o.transpose(1, 2), _squeeze_lse(lse, q.shape[0], q.shape[2], q.shape[1])


def flash_backward(do, q, k, v, o, lse, scale, causal):
    qt, kt, vt = _to_bhtd(q, k, v)
    tq, tk = q.shape[1], k.shape[1]
    seed = torch.zeros((), dtype=torch.int64, device=q.device)       # unused: dropout_p = 0
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do.transpose(1, 2), qt, kt, vt, o.to(q.dtype).transpose(1, 2), lse.float().contiguous(),
        None, None, tq, tk, 0.0, causal, seed, seed, scale=scale)
    return _from_bhtd_grads(dq, dk, dv, k.shape[2])


def cudnn_forward(q, k, v, scale, causal):
    qt, kt, vt = _to_bhtd(q, k, v)
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, causal, False,
                                                             scale=scale)
    o, lse = out[0], out[1]
    return o.transpose(1, 2), _squeeze_lse(lse, q.shape[0], q.shape[2], q.shape[1])


def cudnn_backward(do, q, k, v, o, lse, scale, causal):
    qt, kt, vt = _to_bhtd(q, k, v)
    b, tq, hq, _ = q.shape
    tk = k.shape[1]
    seed = torch.zeros((), dtype=torch.int64, device=q.device)       # unused: dropout_p = 0
    # cuDNN wants out/grad_out with the strides its forward produced ([B, T, H, D] memory order) and the
    # stats as [B, H, T, 1].
    o_t = o.to(q.dtype).contiguous().transpose(1, 2)
    do_t = do.contiguous().transpose(1, 2)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do_t, qt, kt, vt, o_t, lse.float().reshape(b, hq, tq, 1).contiguous(), seed, seed, None,
        None, None, tq, tk, 0.0, causal, scale=scale)
    return _from_bhtd_grads(dq, dk, dv, k.shape[2])
