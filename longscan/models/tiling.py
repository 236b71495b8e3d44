"""Sequence tiling of a token-wise function (TiledMLP of Arctic Long Sequence Training, arXiv 2506.13996).

``tiled(fn, x, params, tile)`` is ``fn(x, *params)`` for a function that treats every token on its own
(an MLP, a norm, a mixer's projections): the forward runs it ``tile`` tokens at a time without keeping
anything but x, and the backward recomputes it tile by tile and takes each tile's gradients before the
next. A `[T, ffn]` intermediate is thus never held for the whole sequence, only for one tile. fn may return
one tensor or a tuple of them (q, k, v, a gate), each `[B, T, ...]`; the whole-sequence outputs are held,
nothing computed between x and them.

``head_groups(pre, mid, post, x, params, groups, tile, along)`` cuts a per-head computation (a linear- or
softmax-attention mixer) into groups of heads the same way: one group's whole-sequence tensors at a time,
forward and backward.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

TileOut = Union[torch.Tensor, tuple[torch.Tensor, ...]]


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tile: int, autocast, n_along: int, x, *rest):
        enabled, dtype = autocast
        along, params = rest[:n_along], rest[n_along:]
        whole, single, T = None, False, x.shape[1]
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            for s in range(0, T, tile):
                y = fn(x[:, s:s + tile], *(a[:, s:s + tile] for a in along), *params)
                single = not isinstance(y, tuple)
                ys = (y,) if single else y
                if whole is None:  # written in place: the tiles and the whole outputs are never held together
                    whole = tuple(t.new_empty((t.shape[0], T, *t.shape[2:])) for t in ys)
                for w, t in zip(whole, ys):
                    w[:, s:s + tile] = t
        ctx.fn, ctx.tile, ctx.autocast, ctx.n_along = fn, tile, autocast, n_along
        ctx.save_for_backward(x, *rest)
        return whole[0] if single else whole

    @staticmethod
    def backward(ctx, *grad_outs):
        x, *rest = ctx.saved_tensors
        along, params = rest[:ctx.n_along], rest[ctx.n_along:]
        enabled, dtype = ctx.autocast
        dx = torch.empty_like(x) if ctx.needs_input_grad[4] else None
        wants = [p.requires_grad for p in params]
        dparams = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) if w else None
                   for p, w in zip(params, wants)]  # bf16 weights sum their tiles in float32
        leaves = [p.detach().requires_grad_(w) for p, w in zip(params, wants)]
        for s in range(0, x.shape[1], ctx.tile):
            xt = x[:, s:s + ctx.tile].detach().requires_grad_(dx is not None)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                y = ctx.fn(xt, *(a[:, s:s + ctx.tile] for a in along), *leaves)
            ys = y if isinstance(y, tuple) else (y,)
            inputs = ([xt] if dx is not None else []) + [p for p in leaves if p.requires_grad]
            grads = torch.autograd.grad(ys, inputs, [g[:, s:s + ctx.tile] for g in grad_outs], allow_unused=True)
            grads = [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
            if dx is not None:
                dx[:, s:s + ctx.tile] = grads.pop(0)
            for i, w in enumerate(wants):
                if w:
                    dparams[i] += grads.pop(0)
        return (None, None, None, None, dx, *[None] * len(along),
                *[d.to(p.dtype) if d is not None else None for d, p in zip(dparams, params)])


def tiled(fn: Callable[..., TileOut], x: torch.Tensor, params: Sequence[torch.Tensor], tile: int,
          along: Sequence[torch.Tensor] = ()) -> TileOut:
    """fn(x, *along, *params) computed ``tile`` tokens at a time along dim 1 of x `[B, T, ...]`, recomputed per
    tile in the backward. ``along``: tensors `[B or 1, T, ...]` that need no gradient (RoPE's tables), cut into
    the same tiles as x. fn must treat tokens independently and use no tensors that need gradients other than
    x and ``params``; it returns one tensor or a tuple of tensors `[B, T, ...]` (returned the same way)."""
    if tile <= 0:
        raise ValueError(f"tile must be a positive number of tokens, got {tile}")
    _check_along(along, x)
    if x.shape[1] <= tile:
        return fn(x, *along, *params)
    return _Tiled.apply(fn, tile, _autocast_state(x.device.type), len(along), x, *along, *params)


def _check_along(along: Sequence[torch.Tensor], x: torch.Tensor) -> None:
    for a in along:
        if a.requires_grad or a.dim() < 2 or a.shape[1] != x.shape[1]:
            raise ValueError(f"along: tensors [B or 1, T={x.shape[1]}, ...] without gradients expected, got "
                             f"shape {tuple(a.shape)} (requires_grad={a.requires_grad})")


def _token_wise(fn: Callable[..., tuple[torch.Tensor, ...]], x: torch.Tensor, params: Sequence[torch.Tensor],
                tile: int, along: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, ...]:
    """fn(x, *along, *params) computed ``tile`` tokens at a time into whole-sequence buffers (no graph kept)."""
    T = x.shape[1]
    if T <= tile:
        return fn(x, *along, *params)
    whole = None
    for s in range(0, T, tile):
        ys = fn(x[:, s:s + tile], *(a[:, s:s + tile] for a in along), *params)
        if whole is None:
            whole = tuple(t.new_empty((t.shape[0], T, *t.shape[2:])) for t in ys)
        for w, t in zip(whole, ys):
            w[:, s:s + tile] = t
    return whole


class _HeadGroups(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, mid, post, groups: int, tile: int, autocast, n_along: int, x, *rest):
        enabled, dtype = autocast
        along, params = rest[:n_along], rest[n_along:]
        y, T = None, x.shape[1]
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            for j in range(groups):
                z = mid(j, *_token_wise(lambda xt, *ps: pre(j, xt, *ps), x, params, tile, along))
                for s in range(0, T, tile):
                    yt = post(j, z[:, s:s + tile], *params)
                    if y is None:  # the groups' sum in float32 at least: one rounding, not one per group
                        y = yt.new_zeros((yt.shape[0], T, *yt.shape[2:]),
                                         dtype=torch.promote_types(yt.dtype, torch.float32))
                    y[:, s:s + tile] += yt
                del z
        ctx.pre, ctx.mid, ctx.post, ctx.groups, ctx.tile, ctx.autocast = pre, mid, post, groups, tile, autocast
        ctx.n_along = n_along
        ctx.save_for_backward(x, *rest)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, *rest = ctx.saved_tensors
        along, params = rest[:ctx.n_along], rest[ctx.n_along:]
        enabled, dtype = ctx.autocast
        dev, T, tile = x.device.type, x.shape[1], ctx.tile
        want_x, wants = ctx.needs_input_grad[7], list(ctx.needs_input_grad[8 + ctx.n_along:])
        dx = torch.zeros_like(x) if want_x else None
        dparams = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) if w else None
                   for p, w in zip(params, wants)]  # bf16 weights sum their groups and tiles in float32
        leaves = [p.detach().requires_grad_(w) for p, w in zip(params, wants)]
        trained = [p for p in leaves if p.requires_grad]

        def add(grads):
            for i, w in enumerate(wants):
                if w:
                    g = grads.pop(0)
                    if g is not None:
                        dparams[i] += g

        for j in range(ctx.groups):
            # this group's attention inputs (recomputed tile by tile without a graph), then the attention's graph
            with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                whole = _token_wise(lambda xt, *ps: ctx.pre(j, xt, *ps), x, leaves, tile, along)
            whole = [t.detach().requires_grad_(t.is_floating_point()) for t in whole]
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                z = ctx.mid(j, *whole)
            dz = torch.empty_like(z)
            for s in range(0, T, tile):  # after the attention: its gradient tile by tile
                zt = z[:, s:s + tile].detach().requires_grad_()
                with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                    yt = ctx.post(j, zt, *leaves)
                grads = list(torch.autograd.grad(yt, [zt, *trained], dy[:, s:s + tile].to(yt.dtype),
                                                 allow_unused=True))
                dz[:, s:s + tile] = grads.pop(0)
                add(grads)
            used = [t for t in whole if t.requires_grad]
            dwhole = dict(zip(map(id, used), torch.autograd.grad(z, used, dz, allow_unused=True)))
            dwhole = [dwhole.get(id(t)) for t in whole]
            del z, dz, whole, used
            for s in range(0, T, tile):  # before the attention: tile by tile into dx
                xt = x[:, s:s + tile].detach().requires_grad_(want_x)
                inputs = ([xt] if want_x else []) + trained
                with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                    outs = ctx.pre(j, xt, *(a[:, s:s + tile] for a in along), *leaves)
                pairs = [(o, d[:, s:s + tile]) for o, d in zip(outs, dwhole) if d is not None]
                if not inputs or not pairs:
                    continue
                grads = list(torch.autograd.grad([o for o, _ in pairs], inputs, [d for _, d in pairs],
                                                 allow_unused=True))
                if want_x:
                    g = grads.pop(0)
                    if g is not None:
                        dx[:, s:s + tile] += g
                add(grads)
        return (None, None, None, None, None, None, None, dx, *[None] * ctx.n_along,
                *[d.to(p.dtype) if d is not None else None for d, p in zip(dparams, params)])


def head_groups(pre: Callable[..., tuple[torch.Tensor, ...]], mid: Callable[..., torch.Tensor],
                post: Callable[..., torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor], groups: int,
                tile: int, along: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The sum over head groups j < ``groups`` of ``post(j, mid(j, *pre(j, x, *params)), *params)``, one group
    at a time, recomputed group by group in the backward; only x and ``params`` are kept.

    pre(j, xt, *along_t, *params): group j's attention inputs (a tuple of `[B, t, ...]`), token-wise, with the
    same tile of each ``along`` tensor (`[B or 1, T, ...]` without gradients: RoPE's tables); mid(j, *inputs):
    the attention over the whole sequence `[B, T, ...]` (it may mix tokens and run collectives; it uses no
    tensor that needs a gradient but its inputs); post(j, zt, *params): group j's token-wise contribution
    `[B, t, D]` to the output. pre and post run ``tile`` tokens at a time. The sum is returned in float32
    (or wider). So only one group's attention inputs, output and their gradients are alive at once."""
    if groups < 1:
        raise ValueError(f"groups must be a positive number of head groups, got {groups}")
    if tile <= 0:
        raise ValueError(f"tile must be a positive number of tokens, got {tile}")
    _check_along(along, x)
    return _HeadGroups.apply(pre, mid, post, groups, tile, _autocast_state(x.device.type), len(along), x, *along,
                             *params)
