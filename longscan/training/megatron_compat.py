"""The one place longscan adapts megatron-core 0.16 to run without CUDA (CPU processes over gloo).

What it works around, exactly:
1. ``megatron.core.pipeline_parallel.schedules`` allocates its token counter with
   ``torch.zeros([], dtype=torch.int, device="cuda")`` in every schedule (no-pipelining and 1F1B alike).
2. ``megatron.core.pipeline_parallel.p2p_communication`` allocates the P2P receive buffers (and shape
   buffers) on ``torch.cuda.current_device()`` and calls ``torch.cuda.synchronize()``.
On a machine without CUDA both raise. :func:`apply` gives those two modules (and only them) a view of
``torch`` in which ``device="cuda"`` means CPU, ``torch.cuda.current_device()`` returns ``"cpu"`` and
``torch.cuda.synchronize()`` is a no-op; every other attribute is the real ``torch``. Nothing changes when
CUDA is available, and no megatron maths is touched: the schedules still run their own 1F1B order.

Other CUDA-only paths are avoided by configuration rather than patched: megatron's
``sequence_parallel`` stays False, ``enable_autocast`` stays False (the trainer autocasts itself),
``batch_p2p_comm`` is False (plain isend/irecv, which gloo supports), ``use_cpu_initialization`` is True
and ``model_parallel_cuda_manual_seed`` is not called (the model has no dropout, so it needs no TP RNG
tracker).
"""
from __future__ import annotations

import types

import torch

_PATCHED_MODULES = ("megatron.core.pipeline_parallel.schedules",
                    "megatron.core.pipeline_parallel.p2p_communication")


def _cpu_device(device):
    if device is None:
        return device
    d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return torch.device("cpu") if d.type == "cuda" else d


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside the patched modules."""

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """``torch`` with CUDA allocations redirected to CPU (only the calls megatron's P2P/schedules make)."""

    cuda = _CpuCuda()

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_cpu_device(device), **kwargs)

    @staticmethod
    def empty(*args, device=None, **kwargs):
        return torch.empty(*args, device=_cpu_device(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_cpu_device(device), **kwargs)


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Patch the two modules when CUDA is unavailable; idempotent. Returns whether a patch is in place."""
    if not needed():
        return False
    import importlib
    for name in _PATCHED_MODULES:
        mod = importlib.import_module(name)
        if not isinstance(mod.torch, _CpuTorch):
            mod.torch = _CpuTorch()
    return True
