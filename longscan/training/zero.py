"""Optional DeepSpeed ZeRO-1 optimizer engine: AdamW states partitioned over the DP×SP group.

megatron-core's schedules run forward and backward (they own the order of microbatches and the
pipeline P2P), so DeepSpeed only gets the step: gradients accumulate in ``param.grad`` as usual, then
``allreduce_gradients`` reduces them over DP×SP and ``step`` clips (norm over the TP×PP model-parallel
group, TP duplicates counted once), updates this rank's partition and all-gathers the parameters.
ZeRO-2 is refused: it reduces gradients from backward hooks keyed to DeepSpeed's own ``backward``
micro-step counter, which megatron's schedule bypasses, so with several microbatches it would reduce
partial gradients.
"""
from __future__ import annotations

import torch


class _MPU:
    """The process-group view DeepSpeed asks for (``mpu``): data parallel = DP×SP, model parallel = TP×PP."""

    def __init__(self, ranks):
        import torch.distributed as dist
        self._r, self._dist = ranks, dist

    def get_data_parallel_group(self):
        return self._r.dp_sp_group

    def get_data_parallel_world_size(self):
        return self._dist.get_world_size(self._r.dp_sp_group)

    def get_data_parallel_rank(self):
        return self._dist.get_rank(self._r.dp_sp_group)

    def get_model_parallel_group(self):
        return self._r.mp_group

    def get_model_parallel_world_size(self):
        return self._dist.get_world_size(self._r.mp_group)

    def get_model_parallel_rank(self):
        return self._dist.get_rank(self._r.mp_group)

    def get_tensor_model_parallel_rank(self):
        return self._r.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self._r.tp


class ZeroEngine:
    """Wraps ``deepspeed.initialize`` for a model whose gradients are already in ``param.grad``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ranks, opt_cfg, micro_batch: int):
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError("optimizer.engine=deepspeed needs DeepSpeed: "
                              "DS_BUILD_OPS=0 pip install 'deepspeed>=0.19'") from e
        import os
        os.environ.setdefault("LOCAL_RANK", str(ranks.rank))  # DeepSpeed insists; torchrun sets it, spawn does not
        mpu = _MPU(ranks)
        self.dp = mpu.get_data_parallel_world_size()
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,  # microbatches are accumulated by megatron's schedule
            "zero_optimization": {"stage": 1, "overlap_comm": False, "contiguous_gradients": False},
            "gradient_clipping": opt_cfg.grad_clip,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            "zero_allow_untested_optimizer": True,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                                 mpu=mpu, dist_init_required=False)

    @property
    def loss_multiplier(self) -> float:
        """DeepSpeed averages gradients over DP×SP; our loss is already the global mean, so undo that."""
        return float(self.dp)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def step(self, lr: float) -> float:
        """Reduce, clip, update; returns the gradient norm before clipping."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.engine.allreduce_gradients()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
