"""What a kernel's forward hands its backward, kept as autograd saved tensors.

A backend may return, beside its outputs, a value for its backward (the Triton kernels' ForwardRecord: segment
prefixes, per-key gate operands). Held as a Python attribute of the autograd context it would outlive what
activation checkpointing frees: torch.utils.checkpoint drops a layer's *saved tensors* after its forward and
recomputes them in the backward, but leaves the context's attributes alone. So the value's tensors go
through ``ctx.save_for_backward`` and the value is rebuilt from them in the backward.
"""
from __future__ import annotations

import dataclasses

import torch


class _Slot:
    """Where tensor ``i`` of the packed list goes back (not a dataclass: _map would look inside it)."""
    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


def _is_record(x) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def _map(x, fn):
    """x with fn applied to every leaf, looking through dataclass fields (the rest is left as it is)."""
    if _is_record(x):
        return dataclasses.replace(x, **{f.name: _map(getattr(x, f.name), fn) for f in dataclasses.fields(x)})
    return fn(x)


def pack(value):
    """-> (tensors, skeleton): the tensors of ``value`` (a dataclass, possibly nested, or a tensor, or None)
    and the value with each of them replaced by its place, for :func:`unpack`."""
    tensors = []

    def take(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return _Slot(len(tensors) - 1)
        return x
    return tensors, _map(value, take)


def unpack(tensors, skeleton):
    """The value :func:`pack` took apart, with ``tensors`` (as autograd hands them back) in their places."""
    return _map(skeleton, lambda x: tensors[x.i] if isinstance(x, _Slot) else x)
