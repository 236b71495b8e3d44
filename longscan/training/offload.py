"""Activation checkpointing whose kept inputs wait in host memory.

``offloaded_checkpoint(run, x, params, stash)`` is ``run(x)`` with the memory of a checkpoint: the forward
runs without keeping activations, and the one tensor a checkpoint keeps, the input x, is copied to pinned
host memory on a side stream (CUDA) and dropped from the device. The backward brings it back, recomputes
``run`` and takes the gradients of x and ``params``. One :class:`HostStash` per forward pass holds the inputs
of every offloaded stage in forward order, so that the backward of one stage starts copying back the
input of the stage before it (the next to run backward) while it computes: the copy is hidden behind one
stage's backward. Without CUDA the host copy is a plain copy and nothing runs on a side stream.

A stash holds every offloaded input of its forward at once (``longscan.training.memory`` predicts how much);
when the host cannot give the memory, :meth:`HostStash.put` raises :class:`HostMemoryError` saying what was
asked, what the stash holds and which options change it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

GiB = 2 ** 30

HostAllocator = Callable[[torch.Size, torch.dtype], torch.Tensor]
"""(shape, dtype) -> an empty host tensor for one offloaded input."""
HostRelease = Callable[[torch.Tensor, "torch.cuda.Event | None"], None]
"""(host tensor, the event after which no copy reads it) -> None: a HostAllocator's tensor given back for reuse
(PinnedPool.release)."""


def pinned_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory, so the copies to and from the GPU run asynchronously."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def host_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Plain host memory (CPU runs: there is no device to copy to)."""
    return torch.empty(shape, dtype=dtype)


class HostMemoryError(RuntimeError):
    """The host could not give the memory for one more offloaded stage input."""


class _Entry:
    """One stage's input: on the host after the forward, back on the device once fetched."""
    __slots__ = ("host", "device", "stored", "fetched", "value")

    def __init__(self, host: torch.Tensor, device: torch.device, stored):
        self.host, self.device, self.stored, self.fetched, self.value = host, device, stored, None, None


class HostStash:
    """The offloaded inputs of one forward pass, in order; CUDA copies run on one side stream.

    allocate: makes each input's host buffer (None: torch's pinned memory on CUDA, plain host memory otherwise).
    release: where a buffer goes once its input is taken back (or the stash is dropped before that), with the
    event after which no copy reads it (None: the buffer is simply dropped).
    """

    def __init__(self, device: torch.device, allocate: HostAllocator | None = None,
                 release: HostRelease | None = None):
        self.release = release
        self.entries: list[_Entry | None] = []
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.allocate = allocate or (pinned_empty if self.stream is not None else host_empty)

    @property
    def held_bytes(self) -> int:
        """Bytes of the host copies not yet taken back."""
        return sum(e.host.numel() * e.host.element_size() for e in self.entries if e is not None)

    def _host_buffer(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.allocate(x.shape, x.dtype)
        except (RuntimeError, MemoryError) as err:
            asked = x.numel() * x.element_size()
            n_held = sum(entry is not None for entry in self.entries)
            pinned = self.stream is not None
            what = "pinned host memory" if pinned else "host memory"
            rounding = (" (torch's pinned allocator rounds each block up to a power of two; memory.pinned = exact "
                        "page-locks exactly the bytes asked)") if self.allocate is pinned_empty else ""
            raise HostMemoryError(
                f"out of {what} for offloaded activations: {asked / GiB:.2f} GiB ({asked} bytes) asked for an "
                f"offloaded stage input {tuple(x.shape)} {x.dtype}, with {self.held_bytes / GiB:.2f} GiB "
                f"({self.held_bytes} bytes) already held by this forward's {n_held} offloaded input(s){rounding}. "
                "memory.blocks or memory.linear_layers / softmax_layers / mlp = offload keep every such input of a "
                "forward in host memory until its backward: set some of them to checkpoint (their inputs stay on "
                "the GPU), offload whole blocks (memory.blocks: one input a block), keep the residual stream in "
                "bf16 (model.residual_dtype) or spread the sequence over a larger parallel.sp") from err

    def put(self, x: torch.Tensor) -> int:
        """Start copying x to the host; -> its index for :meth:`take`."""
        x = x.detach()
        host = self._host_buffer(x)
        if self.stream is None:
            host.copy_(x)
            self.entries.append(_Entry(host, self.device, None))
            return len(self.entries) - 1
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
            stored = torch.cuda.Event()
            stored.record(self.stream)
        x.record_stream(self.stream)  # x's memory is not reused before the copy has read it
        self.entries.append(_Entry(host, self.device, stored))
        return len(self.entries) - 1

    def prefetch(self, i: int) -> None:
        """Start bringing entry i back to the device (no-op when it is gone or already on its way)."""
        if i < 0 or i >= len(self.entries):
            return
        e = self.entries[i]
        if e is None or e.value is not None:
            return
        if self.stream is None:
            e.value = e.host.clone()
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(e.stored)
            e.value = e.host.to(self.device, non_blocking=True)
            e.fetched = torch.cuda.Event()
            e.fetched.record(self.stream)

    def take(self, i: int) -> torch.Tensor:
        """Entry i on the device (waiting for its copy), and release its host memory."""
        self.prefetch(i)
        e = self.entries[i]
        self.entries[i] = None
        if e.fetched is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(e.fetched)
            e.value.record_stream(current)  # allocated on the side stream, used and freed on this one
        if self.release is not None:  # reusable once the copy back (enqueued above, or done on CPU) has read it
            self.release(e.host, e.fetched)
        return e.value

    def close(self) -> None:
        """Give back the host buffers of inputs never taken back (a forward whose backward did not run)."""
        if self.release is None:
            return
        for i, e in enumerate(self.entries):
            if e is not None:
                self.entries[i] = None
                self.release(e.host, e.fetched or e.stored)  # the last copy that touches it

    def __del__(self):
        self.close()


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, stash: HostStash, autocast, x, *params):
        enabled, dtype = autocast
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            out = run(x)
        ctx.run, ctx.stash, ctx.autocast = run, stash, autocast
        ctx.index = stash.put(x)
        ctx.x_requires_grad = x.requires_grad
        ctx.n_params = len(params)
        ctx.save_for_backward(*params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        params = ctx.saved_tensors
        x = ctx.stash.take(ctx.index)
        ctx.stash.prefetch(ctx.index - 1)  # the stage before runs its backward next
        enabled, dtype = ctx.autocast
        xt = x.detach().requires_grad_(ctx.x_requires_grad)
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            out = ctx.run(xt)
        wanted = ([xt] if ctx.x_requires_grad else []) + [p for p in params if p.requires_grad]
        grads = list(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        dx = grads.pop(0) if ctx.x_requires_grad else None
        dparams = [grads.pop(0) if p.requires_grad else None for p in params]
        return (None, None, None, dx, *dparams)


def offloaded_checkpoint(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         params: Sequence[torch.Tensor], stash: HostStash) -> torch.Tensor:
    """run(x), recomputed in the backward from x kept in host memory.

    ``params`` must list every tensor that needs a gradient which ``run`` uses besides x (a module's
    parameters): their gradients are taken in the recomputation and returned through this function.
    """
    return _OffloadedCheckpoint.apply(run, stash, _autocast_state(x.device.type), x, *params)


def stashes_in_graph(t: torch.Tensor) -> list[HostStash]:
    """The HostStash of every offloaded stage in t's autograd graph: what t's backward will take back (between
    a forward and its backward, their ``held_bytes`` are the host memory the offloaded inputs occupy)."""
    found: dict[int, HostStash] = {}
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, _OffloadedCheckpoint._backward_cls):
            found[id(node.stash)] = node.stash
        todo.extend(n for n, _ in node.next_functions)
    return list(found.values())
