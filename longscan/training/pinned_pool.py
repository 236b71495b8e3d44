"""Exactly-sized page-locked host buffers for offloaded activations (``memory.pinned: exact``).

torch's caching host allocator rounds every pinned block up to a power of two, so a 5 GiB offloaded input takes
8 GiB of host memory. :class:`PinnedPool` instead page-locks plain host tensors of exactly the bytes asked
(``cudaHostRegister``), so the copies to and from the GPU stay asynchronous. Each buffer is a tensor whose
storage begins at the locked address: torch's ``is_pinned()`` asks the driver about a storage's first byte, so a
view at an offset into a larger allocation would read as not pinned. Page-locking is slow (it touches every
page), so a buffer is registered once and kept in the pool, by byte size, for the next step: a
:class:`~longscan.training.offload.HostStash` hands each buffer back when the backward takes its input back, and
the next forward reuses it.

A buffer handed back may still be read by a copy to the GPU in flight: it comes back with that copy's event,
and whoever receives it next makes the current stream wait for that event before writing into it.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

Register = Callable[[int, int], None]
"""(address, nbytes) -> None: page-lock a host range, raising RuntimeError when the host cannot."""
Unregister = Callable[[int], None]
"""(address) -> None: undo a Register."""


class ReadyEvent(Protocol):
    """The event after which a handed-back buffer is no longer read (a torch.cuda.Event)."""

    def wait(self, stream=None) -> None: ...

    def synchronize(self) -> None: ...


def cuda_host_register(ptr: int, nbytes: int) -> None:
    """Page-lock ``nbytes`` at ``ptr`` for the CUDA driver (cudaHostRegister, default flags)."""
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed ({cudart.cudaGetErrorString(err)}): the host "
                           "could not page-lock them")


def cuda_host_unregister(ptr: int) -> None:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostUnregister(ptr)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostUnregister failed ({cudart.cudaGetErrorString(err)})")


def no_register(ptr: int, nbytes: int) -> None:
    """CPU runs: nothing to page-lock (the pool's bookkeeping is the same)."""


def no_unregister(ptr: int) -> None:
    """CPU runs: nothing was page-locked."""


PAGE = 4096
"""Page-locking works on whole pages: each buffer starts on its own page, so no two share one."""


@dataclass
class _Buffer:
    memory: torch.Tensor  # flat uint8 tensor of exactly the bytes asked; its storage starts where ``locked`` does
    locked: int  # bytes page-locked (the bytes asked, rounded up to whole pages)
    ready: ReadyEvent | None = None  # the last copy that reads it (None: nothing in flight)


class PinnedPool:
    """Page-locked host buffers of exact byte sizes, reused from step to step.

    :meth:`allocate` is a ``HostAllocator`` (shape, dtype) -> tensor; :meth:`release` takes a tensor it gave back.
    Free buffers of one size are reused last-in first-out. When a size is asked that the pool does not hold free,
    the free buffers of other sizes are unregistered and freed first (a new sequence length replaces the old one's
    buffers), so the pool holds at most what one length's forwards hold at once.
    register / unregister: the page-locking pair (cudaHostRegister on CUDA; tests pass their own); page: the
    granularity of page-locking (each buffer starts on a page of its own and locks whole pages; 1: no alignment).
    """

    def __init__(self, register: Register = cuda_host_register, unregister: Unregister = cuda_host_unregister,
                 page: int = PAGE):
        if page < 1 or page & (page - 1):
            raise ValueError(f"PinnedPool: page must be a power of two >= 1, got {page}")
        self.register, self.unregister, self.page = register, unregister, page
        self.free: dict[int, list[_Buffer]] = {}
        self.lent: dict[int, _Buffer] = {}  # data_ptr -> the buffer a stash holds
        self.registered_bytes = 0
        """Bytes page-locked now (free and lent; each buffer's bytes rounded up to whole pages)."""
        self.peak_registered_bytes = 0
        self.register_seconds = 0.0
        """Seconds spent page-locking since the pool was made."""

    @classmethod
    def for_device(cls, device: torch.device) -> "PinnedPool":
        """A pool that page-locks for CUDA, or, on CPU, one that keeps plain host buffers the same way."""
        if device.type == "cuda":
            return cls()
        return cls(no_register, no_unregister, page=1)

    @property
    def lent_bytes(self) -> int:
        """Bytes of the buffers stashes hold now (as asked, not rounded to pages)."""
        return sum(b.memory.numel() for b in self.lent.values())

    def _evict_other_sizes(self, nbytes: int) -> None:
        for size in [s for s in self.free if s != nbytes]:
            for buf in self.free.pop(size):
                self._unregister(buf)

    def _unregister(self, buf: _Buffer) -> None:
        if buf.ready is not None:  # a copy still reading it must finish before its pages are unlocked
            buf.ready.synchronize()
        self.unregister(buf.memory.data_ptr())
        self.registered_bytes -= buf.locked

    def _new(self, nbytes: int) -> _Buffer:
        self._evict_other_sizes(nbytes)
        locked = -(-nbytes // self.page) * self.page
        owner = torch.empty(locked + self.page - 1, dtype=torch.uint8)
        start = -owner.data_ptr() % self.page
        t0 = time.perf_counter()
        self.register(owner.data_ptr() + start, locked)  # RuntimeError when the host cannot: nothing is kept
        self.register_seconds += time.perf_counter() - t0
        self.registered_bytes += locked
        self.peak_registered_bytes = max(self.peak_registered_bytes, self.registered_bytes)
        window = (ctypes.c_uint8 * nbytes).from_address(owner.data_ptr() + start)
        window.owner = owner  # the allocation lives as long as any tensor over the window does
        return _Buffer(torch.frombuffer(window, dtype=torch.uint8), locked)

    def allocate(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An empty host tensor of ``shape`` and ``dtype`` in a page-locked buffer of exactly its bytes."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        stack = self.free.get(nbytes)
        buf = stack.pop() if stack else self._new(nbytes)
        if stack is not None and not stack:
            del self.free[nbytes]
        if buf.ready is not None:  # the copy that last read it is ordered before anything written now
            buf.ready.wait()
            buf.ready = None
        self.lent[buf.memory.data_ptr()] = buf
        return buf.memory.view(dtype).view(shape)

    def release(self, host: torch.Tensor, ready: ReadyEvent | None = None) -> None:
        """Take back a tensor :meth:`allocate` gave; ``ready``: the event after which nothing reads it."""
        if host.numel() == 0:
            return
        buf = self.lent.pop(host.data_ptr(), None)
        if buf is None:
            raise ValueError(f"PinnedPool.release: a tensor at {host.data_ptr():#x} that this pool did not lend "
                             f"(or that was released already)")
        buf.ready = ready
        self.free.setdefault(buf.memory.numel(), []).append(buf)

    def reset_peak(self) -> None:
        """Start counting ``peak_registered_bytes`` and ``register_seconds`` afresh (a benchmark's timed steps)."""
        self.peak_registered_bytes, self.register_seconds = self.registered_bytes, 0.0

    def clear(self) -> None:
        """Unregister and free every free buffer (lent ones stay until released)."""
        for size in list(self.free):
            for buf in self.free.pop(size):
                self._unregister(buf)

    def __del__(self):
        # registered pages must be unlocked before torch frees them; nothing lent can be read any more
        try:
            self.clear()
            for buf in self.lent.values():
                self._unregister(buf)
            self.lent.clear()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass
