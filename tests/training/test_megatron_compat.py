"""Unit: the CPU adaptation of megatron-core patches exactly the two modules it names."""
from __future__ import annotations

import pytest
import torch

from longscan.training import megatron_compat


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patch only applies without CUDA")
def test_cuda_allocations_in_schedules_and_p2p_land_on_cpu():
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    assert megatron_compat.apply() and megatron_compat.apply()  # idempotent
    for mod in (schedules, p2p_communication):
        assert mod.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
        assert mod.torch.empty((3,), device=mod.torch.cuda.current_device()).device.type == "cpu"
        assert mod.torch.cuda.synchronize() is None
        assert mod.torch.float32 is torch.float32 and mod.torch.distributed is torch.distributed
    assert not isinstance(torch, megatron_compat._CpuTorch)  # the real torch is untouched
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
