"""Cross entropy from the final hidden states without the `[T, vocab]` logits.

``chunked_cross_entropy(hidden, weight, labels, chunk, group)`` is the per-token loss of
``vocab_parallel_cross_entropy(hidden @ weightᵀ, labels)`` (megatron-core's vocab-parallel CE): the rows are
taken ``chunk`` at a time; for each chunk the logits are computed, reduced over the TP group (max, sum of
exponentials, target logit, as megatron's CE does), turned into the loss and the gradients with respect to
the chunk's hidden rows and the weight, and dropped. At most one chunk's logits exist at once.

The gradients are made in the forward for a unit gradient per token. The backward scales them when the
incoming per-token gradient is one value for every token (the trainer's sum times a constant); any other
gradient is honoured by recomputing each chunk's logits in the backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the output projection's matmul runs in: the autocast dtype inside autocast, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, group, vocab_start: int, dtype, need_grad: bool):
        n, vl = hidden.shape[0], weight.shape[0]
        w = weight.to(dtype)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # the matmul's output dtype, as the output layer's backward gives it (bf16 under autocast)
        dh = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_grad else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk].to(dtype)
            z = (h @ w.t()).float()
            z_lse, picked, local = _chunk_stats(z, labels[s:s + chunk], group, vocab_start, vl)
            loss[s:s + chunk] = z_lse - picked
            if need_grad:
                dz = _softmax_minus_onehot(z, z_lse, local).to(dtype)
                dh[s:s + chunk] = dz @ w
                dw += (dz.t() @ h).float()
            del z
        ctx.group, ctx.vocab_start, ctx.chunk, ctx.dtype = group, vocab_start, chunk, dtype
        ctx.save_for_backward(hidden, weight, labels, dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, dh, dw = ctx.saved_tensors
        grad_loss = grad_loss.float()
        if dh is not None and bool(grad_loss.min() == grad_loss.max()):
            g = grad_loss[0]
            d_hidden = dh.to(hidden.dtype) * g.to(hidden.dtype)
            d_weight = (dw * g).to(weight.dtype)
        else:  # per-token weights differ: recompute each chunk's logits, weighted by its tokens' gradients
            d_hidden, d_weight = _recomputed_grads(hidden, weight, labels, grad_loss, ctx)
        _all_reduce(d_hidden, dist.ReduceOp.SUM, ctx.group)  # each TP rank holds its vocabulary slice's part
        return d_hidden, d_weight, None, None, None, None, None, None


def _local_targets(labels, vocab_start: int, vl: int):
    """-> (index into this rank's slice, mask of the labels that fall in it)."""
    local = (labels >= vocab_start) & (labels < vocab_start + vl)
    return torch.where(local, labels - vocab_start, 0), local


def _chunk_stats(z, labels, group, vocab_start: int, vl: int):
    """z `[n, Vl]` float32, shifted in place by the global row max -> (lse, target logit, (idx, mask))."""
    m = _all_reduce(z.max(dim=-1).values, dist.ReduceOp.MAX, group)
    z -= m.unsqueeze(-1)
    idx, mask = _local_targets(labels, vocab_start, vl)
    picked = torch.where(mask, z.gather(1, idx.unsqueeze(1)).squeeze(1), 0.0)
    sum_exp = torch.exp(z).sum(dim=-1)
    both = _all_reduce(torch.stack([picked, sum_exp]), dist.ReduceOp.SUM, group)
    picked, sum_exp = both[0], both[1]
    # z is kept shifted: log-sum-exp of the shifted row, so softmax = exp(z - lse) needs no max again
    return torch.log(sum_exp), picked, (idx, mask)


def _softmax_minus_onehot(z, lse, local):
    """dloss/dz of one chunk for a unit gradient per token (z already shifted by the row max)."""
    idx, mask = local
    p = torch.exp(z - lse.unsqueeze(-1))
    p.scatter_add_(1, idx.unsqueeze(1), -mask.to(p.dtype).unsqueeze(1))
    return p


def _recomputed_grads(hidden, weight, labels, grad_loss, ctx):
    n, vl = hidden.shape[0], weight.shape[0]
    w = weight.to(ctx.dtype)
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for s in range(0, n, ctx.chunk):
        h = hidden[s:s + ctx.chunk].to(ctx.dtype)
        z = (h @ w.t()).float()
        z_lse, _, local = _chunk_stats(z, labels[s:s + ctx.chunk], ctx.group, ctx.vocab_start, vl)
        dz = (_softmax_minus_onehot(z, z_lse, local) * grad_loss[s:s + ctx.chunk].unsqueeze(-1)).to(ctx.dtype)
        d_hidden[s:s + ctx.chunk] = (dz @ w).to(hidden.dtype)
        d_weight += (dz.t() @ h).float()
    return d_hidden, d_weight.to(weight.dtype)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                          group=None, tp_rank: int = 0) -> torch.Tensor:
    """Per-token loss `[...]` float32 of logits ``hidden @ weightᵀ`` over the whole (TP-split) vocabulary.

    hidden `[..., D]`; weight `[V/TP, D]`, this TP rank's rows (rank r holds rows r·V/TP onwards); labels
    `[...]` global token ids; chunk: rows per chunk (> 0); group: the TP process group (None: no TP).
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if hidden.shape[-1] != weight.shape[1] or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
                         f"{tuple(labels.shape)} do not match: expected [..., D], [V/TP, D] and [...]")
    shape = labels.shape
    dtype = _compute_dtype(hidden)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        loss = _ChunkedCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk, group,
                                tp_rank * weight.shape[0], dtype, need_grad)
    return loss.view(shape)
