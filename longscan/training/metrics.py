"""Rank-0 progress line, JSON-lines metrics, TensorBoard (when installed) and Weights & Biases (when asked)."""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def truncate_after(path: str, start_step: int) -> None:
    """Drop the records a run starting at ``start_step`` will write again: steps after it (those of a run
    killed after its last checkpoint), and everything when the run starts from scratch (step 0)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
        if 0 < start_step and step <= start_step:
            keep.append(line)
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def wandb_module():
    """The wandb package, or a ConfigError naming the extra that installs it."""
    try:
        import wandb
    except ImportError as e:
        from longscan.training.config import ConfigError
        raise ConfigError("logging.wandb_project needs the `wandb` package: pip install 'longscan[wandb]'") from e
    return wandb


class MetricsLogger:
    """Writes ``metrics.jsonl`` (one JSON object per record) and TensorBoard scalars under ``run_dir``, and
    Weights & Biases when ``wandb_project`` is set. A run resumed at ``start_step`` first drops the records
    after that step, so every step appears once."""

    def __init__(self, run_dir: str, tensorboard: bool, enabled: bool, wandb_project: str = "",
                 start_step: int = 0, config: dict | None = None):
        self.enabled, self.file, self.tb, self.wandb = enabled, None, None, None
        if not enabled:
            return
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, "metrics.jsonl")
            truncate_after(path, start_step)
            self.file = open(path, "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    # purge_step: TensorBoard hides the events a killed run wrote after the checkpoint
                    self.tb = SummaryWriter(run_dir, purge_step=start_step + 1 if start_step else None)
                except ImportError:  # tensorboard is an optional extra
                    self.tb = None
        if wandb_project:
            self.wandb = self._init_wandb(wandb_project, run_dir, config)

    @staticmethod
    def _init_wandb(project: str, run_dir: str, config: dict | None):
        wandb = wandb_module()
        run_id = None
        id_file = os.path.join(run_dir, "wandb_run_id") if run_dir else ""
        if id_file and os.path.isfile(id_file):  # a resumed run continues its W&B run
            with open(id_file) as f:
                run_id = f.read().strip() or None
        run = wandb.init(project=project, dir=run_dir or None, config=config, id=run_id, resume="allow")
        if id_file:
            with open(id_file, "w") as f:
                f.write(run.id)
        return run

    def log(self, step: int, **values) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class Progress:
    """A one-line progress bar printed every ``every`` steps (lines, so logs stay readable)."""

    def __init__(self, total: int, every: int, enabled: bool, width: int = 20):
        self.total, self.every, self.enabled, self.width = total, max(1, every), enabled, width
        self.t0 = time.time()

    def update(self, step: int, loss: float, tokens_per_s: float, mem_mb: float, lr: float, force=False,
               mfu: float | None = None) -> None:
        if not self.enabled or not (force or step % self.every == 0 or step == self.total):
            return
        done = int(self.width * step / self.total)
        bar = "#" * done + "-" * (self.width - done)
        print(f"[{bar}] step {step:>5}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
              f"{tokens_per_s:,.0f} tok/s{'' if mfu is None else f' | MFU {100 * mfu:.1f}%'} | "
              f"mem {mem_mb:,.0f} MiB | {time.time() - self.t0:.0f}s",
              file=sys.stdout, flush=True)
