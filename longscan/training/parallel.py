"""Process groups (megatron-core parallel_state) and the megatron config the layers and schedules read."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state


@dataclass
class StageConfig(ModelParallelConfig):
    """ModelParallelConfig plus the two TransformerConfig fields megatron's schedules read.

    ``calculate_per_token_loss=True`` makes the schedules leave our loss unscaled: the loss function
    already divides by the token count of the whole global batch (see trainer.loss_func).
    """
    calculate_per_token_loss: bool = True
    fine_grained_activation_offloading: bool = False
    hidden_size: int = 0
    """Width of the activations sent between pipeline stages (`[T_local, B, hidden_size]`)."""


@dataclass
class Ranks:
    """This process's coordinates and groups (SP group = megatron's context-parallel group)."""
    rank: int
    world: int
    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    sp: int
    sp_rank: int
    dp: int
    dp_rank: int
    sp_group: object
    dp_sp_group: object
    mp_group: object

    @property
    def is_log_rank(self) -> bool:
        """The rank that prints: the first rank of the last pipeline stage (it holds the loss)."""
        return self.pp_rank == self.pp - 1 and self.tp_rank == 0 and self.sp_rank == 0 and self.dp_rank == 0


def collective_timeout_s(configured: float, device: torch.device) -> float:
    """parallel.timeout_s, or its default when 0: a few minutes on CPU; on GPU long enough for NCCL's first
    collectives and a large checkpoint save."""
    if configured > 0:
        return configured
    return 1800.0 if device.type == "cuda" else 300.0


def init_groups(tp: int, pp: int, sp: int, timeout_s: float = 1800.0) -> Ranks:
    """Build TP/PP/CP/DP groups over the initialised default process group; their collectives fail after
    ``timeout_s`` seconds instead of waiting for a dead peer."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=sp, create_gloo_process_groups=False,
                                             distributed_timeout_minutes=timeout_s / 60)
    ps = parallel_state
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(),
                 tp=tp, tp_rank=ps.get_tensor_model_parallel_rank(),
                 pp=pp, pp_rank=ps.get_pipeline_model_parallel_rank(),
                 sp=sp, sp_rank=ps.get_context_parallel_rank(),
                 dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
                 sp_group=ps.get_context_parallel_group(),
                 dp_sp_group=ps.get_data_parallel_group(with_context_parallel=True),
                 mp_group=ps.get_model_parallel_group())


def stage_config(tp: int, pp: int, sp: int, hidden_size: int, pipeline_dtype: torch.dtype) -> StageConfig:
    """Megatron config: CPU init of full master weights (TP-size-independent init), plain P2P."""
    return StageConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=sp,
                       use_cpu_initialization=True, perform_initialization=True, params_dtype=torch.float32,
                       hidden_size=hidden_size, pipeline_dtype=pipeline_dtype, batch_p2p_comm=False, sequence_parallel=False,
                       gradient_accumulation_fusion=False)


def init_process_group(timeout_s: float = 0.0, store=None) -> torch.device:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) -> device: from ``store`` (a finished
    rendezvous, RANK/WORLD_SIZE from the environment) or torchrun's environment. ``timeout_s``: see
    :func:`collective_timeout_s`. Does nothing but return the device when already initialised."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kw = dict(timeout=timedelta(seconds=collective_timeout_s(timeout_s, device)))
        if store is not None:
            kw.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        # No device_id: bound to a device, NCCL creates a communicator for each of megatron's groups at once,
        # used or not (each holds device buffers); unbound, a group's communicator comes at its first collective.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw)
    return device

