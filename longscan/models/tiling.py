"""Sequence tiling of a token-wise function (TiledMLP of Arctic Long Sequence Training, arXiv 2506.13996).

``tiled(fn, x, params, tile)`` is ``fn(x, *params)`` for a function that treats every token on its own
(an MLP, a norm): the forward runs it ``tile`` tokens at a time without keeping anything but x, and the
backward recomputes it tile by tile and takes each tile's gradients before the next. A `[T, ffn]`
intermediate is thus never held for the whole sequence, only for one tile.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tile: int, autocast, x, *params):
        enabled, dtype = autocast
        outs = []
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            for s in range(0, x.shape[1], tile):
                outs.append(fn(x[:, s:s + tile], *params))
        ctx.fn, ctx.tile, ctx.autocast = fn, tile, autocast
        ctx.save_for_backward(x, *params)
        return torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        dx = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        wants = [p.requires_grad for p in params]
        dparams = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) if w else None
                   for p, w in zip(params, wants)]  # bf16 weights sum their tiles in float32
        leaves = [p.detach().requires_grad_(w) for p, w in zip(params, wants)]
        for s in range(0, x.shape[1], ctx.tile):
            xt = x[:, s:s + ctx.tile].detach().requires_grad_(dx is not None)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                y = ctx.fn(xt, *leaves)
            inputs = ([xt] if dx is not None else []) + [p for p in leaves if p.requires_grad]
            grads = list(torch.autograd.grad(y, inputs, grad_out[:, s:s + ctx.tile]))
            if dx is not None:
                dx[:, s:s + ctx.tile] = grads.pop(0)
            for i, w in enumerate(wants):
                if w:
                    dparams[i] += grads.pop(0)
        return (None, None, None, dx, *[d.to(p.dtype) if d is not None else None for d, p in zip(dparams, params)])


def tiled(fn: Callable[..., torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor], tile: int) -> torch.Tensor:
    """fn(x, *params) computed ``tile`` tokens at a time along dim 1 of x `[B, T, ...]`, recomputed per tile in
    the backward. fn must treat tokens independently and use no tensors that need gradients other than x and
    ``params``."""
    if tile <= 0:
        raise ValueError(f"tile must be a positive number of tokens, got {tile}")
    if x.shape[1] <= tile:
        return fn(x, *params)
    return _Tiled.apply(fn, tile, _autocast_state(x.device.type), x, *params)
