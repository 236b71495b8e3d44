"""AdamW, warmup + cosine learning rate, gradient reduction over DP×SP and the global-norm clip."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate


def build_adamw(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """Weight decay on matrices only (norm weights and 1-D params are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # CUDA: the fused kernel (one launch for every parameter, not a dozen per parameter); elsewhere the
    # per-parameter loop. Both are elementwise: the same arithmetic for every shard size.
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=False, fused=fused or None)


def lr_at(step: int, cfg_opt, cfg_sched) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio·lr."""
    lr, warm, total = cfg_opt.lr, cfg_sched.warmup_steps, cfg_sched.steps
    if step < warm:
        return lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total - warm))
    floor = cfg_opt.min_lr_ratio * lr
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def allreduce_grads(params: list[torch.nn.Parameter], group) -> None:
    """Sum gradients over ``group`` (DP×SP) in one flat buffer; the loss is already divided by the
    global token count, so the sum is the gradient of the global mean."""
    for p in params:
        if p.grad is None:  # a parameter unused on this rank still takes part in the collective
            p.grad = torch.zeros_like(p)
    if dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def global_grad_norm(params: list[torch.nn.Parameter], mp_group) -> torch.Tensor:
    """L2 norm of the whole model's gradient: TP shards counted once each, TP-replicated params once,
    summed over the model-parallel (TP×PP) group."""
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.double().pow(2).sum()
    if dist.get_world_size(mp_group) > 1:
        dist.all_reduce(sq, group=mp_group)
    return sq.sqrt()


def clip_grads(params: list[torch.nn.Parameter], max_norm: float, mp_group) -> float:
    """Scale gradients so their global norm is at most max_norm; returns the norm before clipping."""
    norm = global_grad_norm(params, mp_group)
    if max_norm > 0:
        coef = max_norm / (norm.item() + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm.item()
