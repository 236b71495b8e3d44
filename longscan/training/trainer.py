"""The training loop: one process per rank, megatron-core schedules for TP × PP × SP × DP.

Loss: every rank sums the per-token losses of its tokens and divides by the token count of the whole
global batch (global_batch_size · seq_len); gradients are then *summed* over DP×SP, which makes them the
gradient of the mean loss over all tokens of the global batch, whatever the split.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from longscan.models import HybridLM, SPSpec
from longscan.observe.flops import device_peak_flops, mfu, step_flops
from longscan.training import megatron_compat
from longscan.training import checkpoint as ckpt
from longscan.training.config import ConfigError, TrainConfig, validate
from longscan.training.data import build_data, stdlib_token_file
from longscan.training.metrics import MetricsLogger, Progress, memory_mb
from longscan.training.optim import allreduce_grads, build_adamw, clip_grads, lr_at
from longscan.training.parallel import init_groups, init_process_group, stage_config


class Trainer:
    """Builds groups, model stage, optimizer and data for this rank; ``train()`` runs the loop."""

    def __init__(self, cfg: TrainConfig):
        self.device = init_process_group()
        self.cfg = validate(cfg, dist.get_world_size())
        megatron_compat.apply()
        p, d, s = cfg.parallel, cfg.data, cfg.schedule
        self.ranks = r = init_groups(p.tp, p.pp, p.sp)
        bf16 = s.precision == "bf16" or (s.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        mp = stage_config(p.tp, p.pp, p.sp, cfg.model.dim, torch.bfloat16 if bf16 else torch.float32)
        sp = SPSpec.from_config(p, r.sp_group)
        self.model = HybridLM(cfg.model, mp, sp, tp_rank=r.tp_rank, tp_size=p.tp, pp_rank=r.pp_rank, pp_size=p.pp,
                              seed=s.seed, activation_checkpointing=s.activation_checkpointing).to(self.device)
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = build_adamw(self.model, cfg.optimizer)
        self.zero = None
        self.loss_multiplier = 1.0
        if cfg.optimizer.engine == "deepspeed":
            from longscan.training.zero import ZeroEngine
            self.zero = ZeroEngine(self.model, self.optimizer, r, cfg.optimizer, d.micro_batch_size)
            self.optimizer = self.zero.optimizer
            self.loss_multiplier = self.zero.loss_multiplier
        if d.source == "stdlib":  # one rank tokenises the corpus into the cache, the others wait
            if r.rank == 0:
                stdlib_token_file(d.cache_dir)
            dist.barrier()
        self.data, meta = build_data(d, r.sp_group, p.layout, p.sp)
        if meta["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the data's vocabulary "
                              f"({meta['vocab_size']}); set model.vocab_size={meta['vocab_size']}")
        self.num_microbatches = d.global_batch_size // (d.micro_batch_size * r.dp)
        self.tokens_per_step = d.global_batch_size * d.seq_len
        self.flops_per_step = step_flops(cfg.model, d.global_batch_size, d.seq_len)
        self.peak_flops = device_peak_flops(self.device)
        # `longscan profile` sets a StepObserver (longscan.observe.recorder); training alone has none
        self.observer = None
        self.forward_backward = get_forward_backward_func()
        self.step = 0
        if cfg.checkpoint.dir and cfg.checkpoint.resume:
            path = ckpt.latest(cfg.checkpoint.dir)
            if path is not None:
                state = ckpt.training_state(self.model, self.optimizer, 0, r.tp_rank, r.rank, materialize=True)
                self.step = ckpt.load(path, state)
                if self.ranks.is_log_rank:
                    print(f"resumed from {path} at step {self.step}", flush=True)

    # ---------------------------------------------------------------- one step ---------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        with self._autocast():
            out = model(mb.tokens.to(self.device), mb.labels.to(self.device))
        return out, self._loss_func

    def _loss_func(self, per_token: torch.Tensor):
        local_sum = per_token.sum()
        n = torch.tensor(per_token.numel(), dtype=torch.int)
        return local_sum * (self.loss_multiplier / self.tokens_per_step), n, {"loss_sum": local_sum.detach()}

    def _run(self, microbatches, forward_only: bool) -> float:
        """Forward (and backward) over this rank's microbatches; returns the global loss sum."""
        d = self.cfg.data
        store = self.forward_backward(forward_step_func=self._forward_step, data_iterator=iter(microbatches),
                                      model=[self.model], num_microbatches=self.num_microbatches,
                                      seq_length=d.seq_len, micro_batch_size=d.micro_batch_size,
                                      forward_only=forward_only)
        r = self.ranks
        local = sum(float(x["loss_sum"]) for x in store) if (r.pp_rank == r.pp - 1 and r.tp_rank == 0) else 0.0
        total = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)  # last stage, TP rank 0 of every DP×SP replica contributes its tokens
        return total.item()

    def train_step(self) -> dict:
        """One optimizer step on global batch ``self.step``; returns its metrics."""
        c, r = self.cfg, self.ranks
        t0 = time.time()
        self.model.train()
        if self.zero:
            self.zero.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        mbs = self.data.train_microbatches(self.step, c.data.global_batch_size, c.data.micro_batch_size,
                                           r.dp_rank, r.dp)
        loss = self._run(mbs, forward_only=False) / self.tokens_per_step
        lr = lr_at(self.step, c.optimizer, c.schedule)
        with self._phase("optimizer"):
            if self.zero:
                norm = self.zero.step(lr)
            else:
                allreduce_grads(self.params, r.dp_sp_group)
                norm = clip_grads(self.params, c.optimizer.grad_clip, r.mp_group)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.optimizer.step()
        self.step += 1
        dt = time.time() - t0
        return {"loss": loss, "lr": lr, "grad_norm": norm, "step_time": dt,
                "tokens_per_s": self.tokens_per_step / dt, "mem_mb": memory_mb(self.device),
                "mfu": mfu(self.flops_per_step, dt, r.world, self.peak_flops)}

    def _phase(self, name: str):
        return contextlib.nullcontext() if self.observer is None else self.observer.phase(name)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over ``schedule.val_batches`` global batches of the validation split."""
        c, r = self.cfg, self.ranks
        self.model.eval()
        total = 0.0
        for b in range(c.schedule.val_batches):
            mbs = self.data.val_microbatches(b, c.data.global_batch_size, c.data.micro_batch_size, r.dp_rank, r.dp)
            total += self._run(mbs, forward_only=True)
        return total / (c.schedule.val_batches * self.tokens_per_step)

    def save(self) -> str:
        state = ckpt.training_state(self.model, self.optimizer, self.step, self.ranks.tp_rank, self.ranks.rank)
        return ckpt.save(self.cfg.checkpoint.dir, self.step, state, self.cfg.checkpoint.keep)

    # ---------------------------------------------------------------- the loop ---------------------------
    def describe(self) -> str:
        c, r, m = self.cfg, self.ranks, self.cfg.model
        n = sum(q.numel() for q in self.params)
        return (f"longscan train | world {r.world} = tp {r.tp} × pp {r.pp} × sp {r.sp} × dp {r.dp} | "
                f"layout {c.parallel.layout}, linear SP {c.parallel.linear_method}, softmax SP "
                f"{c.parallel.softmax_method} | model {m.n_layers}×{m.pattern} ({m.linear_variant}), dim {m.dim}, "
                f"{n:,} params on this rank | seq {c.data.seq_len} ({c.data.seq_len // r.sp}/rank), "
                f"batch {c.data.global_batch_size} ({self.num_microbatches} microbatches/rank) | "
                f"{self.device.type}, {'bf16' if self.autocast_dtype else 'fp32'}")

    def train(self) -> dict:
        """Run to ``schedule.steps`` (or ``logging.stop_after``); returns {"train": [(step, loss)], "val": [...]}."""
        c = self.cfg
        log_rank = self.ranks.is_log_rank
        # The loss lives on the last stage; rank 0 of the world prints only when it holds it.
        printer = log_rank
        metrics = MetricsLogger(c.logging.dir, c.logging.tensorboard, log_rank, c.logging.wandb_project, self.step,
                                c.to_dict())
        progress = Progress(c.schedule.steps, c.logging.log_every, printer)
        if printer:
            print(self.describe(), flush=True)
        history = {"train": [], "val": []}
        end = c.schedule.steps if not c.logging.stop_after else min(c.schedule.steps, c.logging.stop_after)
        if self.step == 0 and c.schedule.val_every:
            v = self.evaluate()
            history["val"].append((0, v))
            metrics.log(0, val_loss=v)
            if printer:
                print(f"step {0:>5} | val loss {v:.4f}", flush=True)
        while self.step < end:
            m = self.train_step()
            history["train"].append((self.step, m["loss"]))
            metrics.log(self.step, **m)
            progress.update(self.step, m["loss"], m["tokens_per_s"], m["mem_mb"], m["lr"], mfu=m["mfu"])
            last = self.step == c.schedule.steps
            if (c.schedule.val_every and self.step % c.schedule.val_every == 0) or last:
                v = self.evaluate()
                history["val"].append((self.step, v))
                metrics.log(self.step, val_loss=v)
                if printer:
                    print(f"step {self.step:>5} | val loss {v:.4f}", flush=True)
            if c.checkpoint.dir and ((c.checkpoint.every and self.step % c.checkpoint.every == 0) or last):
                path = self.save()
                if printer:
                    print(f"checkpoint {path}", flush=True)
        metrics.close()
        return history
