"""The training loop: one process per rank, megatron-core schedules for TP × PP × SP × DP.

Loss: every rank sums the per-token losses of its tokens and divides by the token count of the whole
global batch (global_batch_size · seq_len); gradients are then *summed* over DP×SP, which makes them the
gradient of the mean loss over all tokens of the global batch, whatever the split.

Each step ends with one small all-reduce of two flags over the world, so that every rank takes the same
decision: skip the update (a non-finite loss or gradient norm on any rank) and stop at this step boundary
(a SIGTERM/SIGINT/SIGUSR1 seen by any rank).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import uuid

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from longscan.distributed.sync import barrier
from longscan.models import HybridLM, SPSpec
from longscan.observe.flops import device_peak_flops, mfu, step_flops
from longscan.training import megatron_compat
from longscan.training import checkpoint as ckpt
from longscan.training.config import ConfigError, TrainConfig, validate
from longscan.training.data import build_data, stdlib_token_file
from longscan.training.lifecycle import StopRequest
from longscan.training.lock import DirectoryLock
from longscan.training.metrics import MetricsLogger, Progress, memory_mb
from longscan.training.grad_reduce import GradReducer
from longscan.training.optim import allreduce_grads, build_adamw, global_grad_norm, lr_at
from longscan.training.packing import DocumentBalance, DocumentMicrobatch, DocumentPackedData
from longscan.training.parallel import collective_timeout_s, init_groups, init_process_group, stage_config
from longscan.training.reshard import load_resharded


class TrainingDiverged(RuntimeError):
    """``schedule.max_skipped_steps`` consecutive steps had a non-finite loss or gradient norm."""


def check_reliability_options(cfg: TrainConfig) -> None:
    """The options this loop adds; raises ConfigError naming the key."""
    if cfg.schedule.max_skipped_steps < 1:
        raise ConfigError(f"schedule.max_skipped_steps must be >= 1, got {cfg.schedule.max_skipped_steps}")
    if cfg.parallel.timeout_s < 0:
        raise ConfigError(f"parallel.timeout_s must be >= 0 seconds (0 = default), got {cfg.parallel.timeout_s}")
    if cfg.checkpoint.keep < 0:
        raise ConfigError(f"checkpoint.keep must be >= 0 (0 = keep all), got {cfg.checkpoint.keep}")


def _json_safe(values: dict) -> dict:
    """metrics.jsonl stays strict JSON: a non-finite number is written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _agree(fn):
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its exception."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # re-raised on every rank below
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


class Trainer:
    """Builds groups, model stage, optimizer and data for this rank; ``train()`` runs the loop.

    ``stop``: the signal record of this process (see lifecycle.StopRequest); none installed by default.
    """

    def __init__(self, cfg: TrainConfig, stop: StopRequest | None = None):
        check_reliability_options(cfg)
        self.device = init_process_group(cfg.parallel.timeout_s)
        self.cfg = validate(cfg, dist.get_world_size())
        self.stop = stop if stop is not None else StopRequest()
        self.activity = "startup"
        """What this rank is doing, collective-wise: named when a collective times out."""
        megatron_compat.apply()
        p, d, s = cfg.parallel, cfg.data, cfg.schedule
        self.ranks = r = init_groups(p.tp, p.pp, p.sp, collective_timeout_s(p.timeout_s, self.device))
        bf16 = s.precision == "bf16" or (s.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        mp = stage_config(p.tp, p.pp, p.sp, cfg.model.dim, torch.bfloat16 if bf16 else torch.float32)
        sp = SPSpec.from_config(p, r.sp_group, cfg.kernels.options(), cfg.kernels.delta_path)
        self.model = HybridLM(cfg.model, mp, sp, tp_rank=r.tp_rank, tp_size=p.tp, pp_rank=r.pp_rank, pp_size=p.pp,
                              seed=s.seed, activation_checkpointing=s.activation_checkpointing,
                              memory=cfg.memory.options()).to(self.device)
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
            barrier()
        self.data, meta = build_data(d, r.sp_group, p.layout, p.sp)
        if d.pack_documents:
            balance = DocumentBalance(p.sp, p.layout) if d.balance_documents else None
            self.data = DocumentPackedData(self.data, meta["eos"], balance)
        if meta["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the data's vocabulary "
                              f"({meta['vocab_size']}); set model.vocab_size={meta['vocab_size']}")
        self.num_microbatches = d.global_batch_size // (d.micro_batch_size * r.dp)
        self.reducer = None
        if self.zero is None and cfg.optimizer.overlap_grad_reduce and dist.get_world_size(r.dp_sp_group) > 1:
            self.reducer = GradReducer(self.params, r.dp_sp_group, self.num_microbatches,
                                       scope=lambda: self._phase("optimizer"))
        self.tokens_per_step = d.global_batch_size * d.seq_len
        self.flops_per_step = step_flops(cfg.model, d.global_batch_size, d.seq_len)
        self.peak_flops = device_peak_flops(self.device)
        # `longscan profile` sets a StepObserver (longscan.observe.recorder); training alone has none
        self.observer = None
        self.forward_backward = get_forward_backward_func()
        self.step = 0
        self.skipped_total = 0
        self.skipped_in_a_row = 0
        self.stop_signal = None
        """The signal (SIGTERM/SIGINT/SIGUSR1) the run stopped on, when it did."""
        self.lock: DirectoryLock | None = None
        self.run_id = ""
        self.last_checkpoint: str | None = None
        self.unconfirmed_checkpoint: str | None = None
        """The newest checkpoint until a step run from its state has a finite loss and gradient."""
        if cfg.checkpoint.dir:
            self.activity = "checkpoint directory lock and resume"
            self._open_checkpoint_dir()

    # ---------------------------------------------------------------- checkpoint directory ---------------
    def layout(self) -> dict:
        """What a checkpoint records about this run and checks on resume."""
        p = self.cfg.parallel
        return {"tp": p.tp, "pp": p.pp, "sp": p.sp, "dp": p.dp, "model": dataclasses.asdict(self.cfg.model)}

    def _open_checkpoint_dir(self) -> None:
        c = self.cfg.checkpoint

        def lock_and_prepare() -> str:
            self.lock = DirectoryLock(c.dir).acquire()
            try:
                existing = [os.path.basename(p) for _, p in ckpt.complete(c.dir)]
                if existing and not c.resume:
                    if not c.overwrite:
                        raise ConfigError(f"checkpoint.dir {c.dir!r} already holds checkpoints ({', '.join(existing)})"
                                          " and checkpoint.resume=false: set checkpoint.overwrite=true to delete them "
                                          "and start over, or use another checkpoint.dir")
                    print(f"checkpoint.overwrite: deleted {', '.join(ckpt.clear(c.dir))} from {c.dir}", flush=True)
            except BaseException:
                self.close()
                raise
            return uuid.uuid4().hex

        self.run_id = _agree(lock_and_prepare)  # rank 0 holds the lock; every rank gets its refusal
        if not c.resume:
            return
        try:
            self._resume(c.dir)
        except BaseException:
            self.close()
            raise

    def _resume(self, ckpt_dir: str) -> None:
        r = self.ranks
        layout = self.layout()
        # ZeRO partitions the optimizer state its own way: only torch's AdamW state is resharded
        path, marker, notes = ckpt.select(ckpt_dir, layout, reshard=self.zero is None)
        if r.rank == 0:
            for n in notes:
                print(f"longscan train: {n}", flush=True)
        if path is not None:
            if ckpt.needs_reshard(marker, layout):
                self.step = load_resharded(path, marker, self.model, self.optimizer, r.tp, r.tp_rank)
                if self.ranks.is_log_rank:
                    saved = marker["layout"]
                    print(f"resharded {path}: TP {saved['tp']} -> {r.tp}, PP {saved['pp']} -> {r.pp}", flush=True)
            else:
                state = ckpt.training_state(self.model, self.optimizer, 0, r.tp_rank, r.rank, materialize=True)
                self.step = ckpt.load(path, state, marker)
            self.run_id = marker.get("run_id") or self.run_id  # a resumed run prunes the checkpoints it resumed
            self.last_checkpoint = path
            if self.ranks.is_log_rank:
                print(f"resumed from {path} at step {self.step}", flush=True)

    def close(self) -> None:
        """Release the checkpoint directory (rank 0's lock); ``train()`` does when it returns or raises."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---------------------------------------------------------------- one step ---------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        docs = {}
        if isinstance(mb, DocumentMicrobatch):
            docs = dict(cu_seqlens=mb.cu_seqlens, doc_positions=mb.positions.to(self.device),
                        loss_mask=mb.loss_mask.to(self.device))
        with self._autocast():
            out = model(mb.tokens.to(self.device), mb.labels.to(self.device), **docs)
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
        n = self.step + 1
        mbs = self.data.train_microbatches(self.step, c.data.global_batch_size, c.data.micro_batch_size,
                                           r.dp_rank, r.dp)
        self.activity = f"forward/backward of step {n} (pipeline and SP collectives, loss all-reduce)"
        if self.reducer is not None:
            self.reducer.start()
        loss = self._run(mbs, forward_only=False) / self.tokens_per_step
        lr = lr_at(self.step, c.optimizer, c.schedule)
        with self._phase("optimizer"):
            self.activity = f"gradient all-reduce and norm of step {n}"
            if self.zero:  # DeepSpeed reduces and clips inside its step: check the local gradients before it
                norm = float("nan")
                finite = all(bool(torch.isfinite(q.grad).all()) for q in self.params if q.grad is not None)
            else:
                if self.reducer is not None:
                    self.reducer.finish()
                else:
                    allreduce_grads(self.params, r.dp_sp_group)
                norm = global_grad_norm(self.params, r.mp_group).item()
                finite = math.isfinite(norm)
            finite = finite and math.isfinite(loss)
            self.activity = f"skip/stop flag all-reduce of step {n}"
            flags = torch.tensor([0 if finite else 1, self.stop.priority], dtype=torch.int64, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            skipped, stop = bool(flags[0].item()), int(flags[1].item())
            if skipped:  # no parameter or optimizer-state change
                self.skipped_total += 1
                self.skipped_in_a_row += 1
            elif self.zero:
                norm = self.zero.step(lr)
                self.skipped_in_a_row = 0
            else:
                if c.optimizer.grad_clip > 0:
                    coef = c.optimizer.grad_clip / (norm + 1e-6)
                    if coef < 1.0:
                        for q in self.params:
                            if q.grad is not None:
                                q.grad.mul_(coef)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.optimizer.step()
                self.skipped_in_a_row = 0
        if stop:
            self.stop_signal = StopRequest.signal_of(stop)
        self.step += 1
        dt = time.time() - t0
        return {"loss": loss, "lr": lr, "grad_norm": norm, "skipped": skipped, "skipped_total": self.skipped_total,
                "step_time": dt, "tokens_per_s": self.tokens_per_step / dt, "mem_mb": memory_mb(self.device),
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

    def save(self) -> str | None:
        """Collective: checkpoint the current step; None (and nothing written) when any rank's state is
        not finite. Until a step run from the new checkpoint is finite, the previous one is kept too."""
        self.activity = f"checkpoint save at step {self.step}"
        state = ckpt.training_state(self.model, self.optimizer, self.step, self.ranks.tp_rank, self.ranks.rank)
        if not ckpt.state_is_finite(state, self.device):
            if self.ranks.rank == 0:
                print(f"longscan train: checkpoint at step {self.step} not written: the parameters or optimizer "
                      "state are not finite", flush=True)
            return None
        c = self.cfg.checkpoint
        path = ckpt.save(c.dir, self.step, state, c.keep, self.run_id, self.layout(), protect=self.last_checkpoint)
        self.last_checkpoint = self.unconfirmed_checkpoint = path
        return path

    def _confirm_checkpoint(self) -> None:
        """A finite step ran from the newest checkpoint's state: the one kept beside it may go now."""
        if self.unconfirmed_checkpoint is None:
            return
        self.unconfirmed_checkpoint = None
        if self.ranks.rank == 0:
            ckpt.prune(self.cfg.checkpoint.dir, self.cfg.checkpoint.keep, self.run_id)

    def _set_aside_unconfirmed_checkpoint(self) -> str | None:
        """On divergence: the newest checkpoint was followed only by non-finite steps; move it out of
        resume's way (kept as ``<name>.diverged`` for inspection). Returns the new path."""
        path = self.unconfirmed_checkpoint
        if path is None:
            return None
        self.unconfirmed_checkpoint = None
        aside = path + ".diverged"
        if self.ranks.rank == 0:
            os.replace(path, aside)
        barrier()
        return aside

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
            metrics.log(0, **_json_safe({"val_loss": v}))
            if printer:
                print(f"step {0:>5} | val loss {v:.4f}", flush=True)
        try:
            while self.step < end:
                m = self.train_step()
                history["train"].append((self.step, m["loss"]))
                metrics.log(self.step, **_json_safe(m))
                if m["skipped"]:
                    self._on_skipped(m, printer)
                    if self.stop_signal:
                        if printer:
                            print(f"longscan train: stopped by {self.stop_signal.name} after step {self.step}, a "
                                  "skipped step (no checkpoint written)", flush=True)
                        break
                    continue
                self._confirm_checkpoint()
                progress.update(self.step, m["loss"], m["tokens_per_s"], m["mem_mb"], m["lr"], mfu=m["mfu"])
                last = self.step == c.schedule.steps
                if ((c.schedule.val_every and self.step % c.schedule.val_every == 0) or last) and not self.stop_signal:
                    self.activity = f"validation at step {self.step}"
                    v = self.evaluate()
                    history["val"].append((self.step, v))
                    metrics.log(self.step, **_json_safe({"val_loss": v}))
                    if printer:
                        print(f"step {self.step:>5} | val loss {v:.4f}", flush=True)
                due = (c.checkpoint.every and self.step % c.checkpoint.every == 0) or last
                if c.checkpoint.dir and (due or self._save_on_stop()):
                    path = self.save()
                    if printer and path:
                        print(f"checkpoint {path}", flush=True)
                if self.stop_signal:
                    if printer:
                        nothing = self._save_on_stop() and not c.checkpoint.dir
                        unsaved = " (no checkpoint.dir: nothing saved)" if nothing else ""
                        print(f"longscan train: stopped by {self.stop_signal.name} after step {self.step}{unsaved}",
                              flush=True)
                    break
        finally:
            metrics.close()
            self.close()  # the run is over: the checkpoint directory is free for the next one
        return history

    def _save_on_stop(self) -> bool:
        return bool(self.stop_signal) and (self.stop_signal.name == "SIGUSR1" or self.cfg.checkpoint.on_signal)

    def _on_skipped(self, m: dict, printer: bool) -> None:
        """A skipped step: report it; stop after ``schedule.max_skipped_steps`` of them in a row."""
        k = self.cfg.schedule.max_skipped_steps
        if printer:
            print(f"longscan train: step {self.step}: non-finite loss ({m['loss']}) or gradient norm "
                  f"({m['grad_norm']}); update skipped ({self.skipped_in_a_row} in a row of at most {k}, "
                  f"{self.skipped_total} in all)", flush=True)
        if self.skipped_in_a_row >= k:
            first = self.step - self.skipped_in_a_row + 1
            aside = self._set_aside_unconfirmed_checkpoint()
            note = (f"; checkpoint {aside[:-len('.diverged')]} was followed only by non-finite steps and was "
                    f"moved to {aside}" if aside else "")
            resume = ckpt.latest(self.cfg.checkpoint.dir) if self.cfg.checkpoint.dir else None
            raise TrainingDiverged(
                f"stopping at step {self.step}: {k} consecutive steps ({first}-{self.step}) had a non-finite loss "
                f"or gradient norm (schedule.max_skipped_steps = {k}){note}; "
                + (f"the newest finite checkpoint is {resume}" if resume else "no checkpoint to resume from"))
