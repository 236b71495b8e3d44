"""Rank-0 progress line, JSON-lines metrics and (when installed) TensorBoard."""
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


class MetricsLogger:
    """Writes ``metrics.jsonl`` (one JSON object per record) and TensorBoard scalars under ``run_dir``."""

    def __init__(self, run_dir: str, tensorboard: bool, enabled: bool):
        self.enabled, self.file, self.tb = enabled, None, None
        if not (enabled and run_dir):
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(run_dir)
            except ImportError:  # tensorboard is an optional extra
                self.tb = None

    def log(self, step: int, **values) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


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
