"""`longscan sweep`: a few training steps at each sequence length (and SP size), or the longest that fits.

Per attempt: step time, tokens/s per GPU, MFU, peak memory per GPU (CUDA max allocated and reserved; on CPU
the peak RSS, sampled) and the exposed-communication fraction. An out-of-memory error (or, with
``--memory-cap-mb``, a peak above the cap) is caught, the memory freed, every rank told (an all-reduce of the
outcome), and the sweep goes on. Writes DIR/sweep.csv, DIR/sweep.md (sequence length × GPUs, as in LASP-2's
Table 6) and DIR/sweep.png (with matplotlib).
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from longscan.observe.launch import NO_CHECKPOINTS, checked_overrides, launch, local_world, under_torchrun

PROG = "longscan sweep"
GRANULE = 64   # --max bisects to a multiple of this many tokens per layout piece (the kernels' chunk)


@dataclass(frozen=True)
class SweepOptions:
    seq_lens: tuple[int, ...] = ()
    find_max: bool = False
    sp_sizes: tuple[int, ...] = ()       # () = the config's parallel.sp only
    steps: int = 2
    warmup: int = 1
    max_len: int = 1 << 24               # --max stops doubling here
    memory_cap_mb: float = 0.0           # 0 = only real out-of-memory errors
    out: str = "sweep"

    def __post_init__(self):
        if bool(self.seq_lens) == self.find_max:
            raise ValueError("give exactly one of --seq-lens L1,L2,... and --max")
        if any(n < 1 for n in self.seq_lens):
            raise ValueError(f"--seq-lens must be positive integers, got {list(self.seq_lens)}")
        if any(s < 1 for s in self.sp_sizes):
            raise ValueError(f"--sp-sizes must be positive integers, got {list(self.sp_sizes)}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {self.steps}, {self.warmup}")
        if self.memory_cap_mb < 0:
            raise ValueError(f"--memory-cap-mb must be >= 0, got {self.memory_cap_mb}")


@dataclass
class Row:
    sp: int
    dp: int
    gpus: int
    seq_len: int
    status: str                     # ok | oom | error
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None
    peak_allocated_mb: float | None = None   # CUDA max allocated; CPU peak RSS
    peak_reserved_mb: float | None = None    # CUDA max reserved; CPU: None
    exposed_comm_fraction: float | None = None
    note: str = ""


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train a few steps at each sequence length.")
    p.add_argument("--config", default=None)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--seq-lens", default="", help="total sequence lengths, e.g. 4096,8192,16384")
    g.add_argument("--max", action="store_true", help="double from data.seq_len until OOM, then bisect")
    p.add_argument("--sp-sizes", default="", help="SP sizes to try, e.g. 1,2,4, or 'all' (default: parallel.sp)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per attempt (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--max-len", type=int, default=1 << 24, help="--max stops doubling here")
    p.add_argument("--memory-cap-mb", type=float, default=0.0,
                   help="count a peak above this (MiB per GPU / process) as out of memory (default: off)")
    p.add_argument("--out", default="sweep")
    p.add_argument("--nproc", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    return p


def sp_sizes_for(text: str, world: int, tp: int, pp: int) -> tuple[int, ...]:
    """'all': every SP size that divides world/(tp·pp); else the listed ones."""
    if text != "all":
        return _ints(text, "--sp-sizes")
    rest = world // (tp * pp)
    return tuple(s for s in range(1, rest + 1) if rest % s == 0)


def _options(a, world: int, tp: int, pp: int) -> SweepOptions:
    return SweepOptions(seq_lens=_ints(a.seq_lens, "--seq-lens") if a.seq_lens else (), find_max=a.max,
                        sp_sizes=sp_sizes_for(a.sp_sizes, world, tp, pp) if a.sp_sizes else (),
                        steps=a.steps, warmup=a.warmup, max_len=a.max_len, memory_cap_mb=a.memory_cap_mb,
                        out=a.out)


def check_lengths(cfg_path, overrides, opts: SweepOptions, world: int) -> None:
    """Every (SP size, length) asked for must be a valid config for ``world`` (ConfigError naming it)."""
    from longscan.training.config import load_config, validate
    for sp in opts.sp_sizes or (None,):
        extra = [f"parallel.sp={sp}", "parallel.dp=0"] if sp else []
        for n in opts.seq_lens or (None,):
            validate(load_config(cfg_path, overrides + extra + ([f"data.seq_len={n}"] if n else [])), world)


def cmd_sweep(argv: list[str]) -> int:
    from longscan.training.config import ConfigError, load_config
    a = parser().parse_args(argv)
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else (a.nproc or local_world())
    try:
        p = load_config(a.config, a.overrides).parallel
        opts = _options(a, world, p.tp, p.pp)
        if not under_torchrun():
            overrides = checked_overrides(PROG, a.config, a.overrides, world)
            if overrides is None:
                return 2
            check_lengths(a.config, overrides, opts, world)
    except (ValueError, ConfigError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if not under_torchrun():
        return launch(PROG, ["sweep"] + argv_without_nproc(argv), world)
    from longscan.training.parallel import init_process_group
    init_process_group()
    rows = run_sweep(a.config, a.overrides, opts)
    if dist.get_rank() == 0:
        write_outputs(rows, opts.out)
        print(markdown_table(rows), flush=True)
    dist.destroy_process_group()
    return 0


def argv_without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x == "--nproc":
            skip = True
            continue
        if not x.startswith("--nproc="):
            out.append(x)
    return out


# ---- memory -------------------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory of this process while open, sampled every ``interval`` s (CPU runs)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:   # no /proc (not Linux): the process's peak so far
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


# ---- the sweep ----------------------------------------------------------------------------------------------
def attempt(cfg_path, overrides, sp: int | None, seq_len: int, opts: SweepOptions) -> Row:
    """Train warmup + steps at one (SP size, length); every rank returns the same status."""
    from longscan.distributed import stats
    from longscan.observe.flops import mfu
    from longscan.observe.recorder import CommRecorder, dist_wrappers
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    extra = ([f"parallel.sp={sp}", "parallel.dp=0"] if sp else []) + [f"data.seq_len={seq_len}"]
    cfg = load_config(cfg_path, overrides + extra + NO_CHECKPOINTS)
    from longscan.training.parallel import init_process_group
    device = init_process_group()
    cuda = device.type == "cuda"
    world = dist.get_world_size()
    row, trainer, failure = Row(sp=cfg.parallel.sp, dp=0, gpus=world, seq_len=seq_len, status="ok"), None, None
    try:
        trainer = Trainer(cfg)
        row.sp, row.dp = trainer.ranks.sp, trainer.ranks.dp
        for _ in range(opts.warmup):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rec = CommRecorder(device)   # every collective's exposed time; no layer hooks, no profiler
        wrappers = dist_wrappers(rec, trainer)
        wrappers.install()
        stats.set_recorder(rec)
        try:
            with (PeakRSS() if not cuda else _Nothing()) as rss:
                times = []
                for _ in range(opts.steps):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    trainer.train_step()
                    rec.resolve()
                    times.append(time.perf_counter() - t0)
        finally:
            stats.set_recorder(None)
            wrappers.remove()
        dt = sum(times) / len(times)
        row.step_time_s = dt
        row.tokens_per_s = trainer.tokens_per_step / dt
        row.tokens_per_s_per_gpu = row.tokens_per_s / world
        row.mfu = mfu(trainer.flops_per_step, dt, world, trainer.peak_flops)
        row.exposed_comm_fraction = sum(e.exposed_s for e in rec.comm.values()) / sum(times)
        if cuda:
            row.peak_allocated_mb = torch.cuda.max_memory_allocated() / 2**20
            row.peak_reserved_mb = torch.cuda.max_memory_reserved() / 2**20
        else:
            row.peak_allocated_mb = rss.peak / 2**20
    except BaseException as e:  # noqa: BLE001  (decided below: OOM goes on, anything else is re-raised)
        if not is_oom(e):
            raise
        failure = f"{type(e).__name__}"
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    over = bool(opts.memory_cap_mb and row.peak_allocated_mb and row.peak_allocated_mb > opts.memory_cap_mb)
    flag = torch.tensor([1 if (failure or over) else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)   # one rank out of memory: every rank records the OOM
    if int(flag.item()):
        row.status = "oom"
        row.note = failure or ("over --memory-cap-mb" if over else "out of memory on another rank")
    return row


class _Nothing:
    peak = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def granule(cfg, sp: int) -> int:
    pieces = sp * (2 if cfg.parallel.layout == "zigzag" else 1)
    return GRANULE * pieces


def longest_fit(start: int, step: int, max_len: int, fits) -> int:
    """Double from ``start`` while ``fits(n)`` (up to ``max_len``), then bisect, in multiples of ``step``, between
    the longest length that fit and the shortest that did not -> the longest that fits (0: not even start)."""
    n = max(step, start // step * step)
    fit, fail = 0, 0
    while n <= max_len:
        if not fits(n):
            fail = n
            break
        fit, n = n, 2 * n
    while fail and fail - fit > step:
        mid = (fit + fail) // 2 // step * step
        if mid in (fit, fail):
            break
        fit, fail = (mid, fail) if fits(mid) else (fit, mid)
    return fit


def run_sweep(cfg_path, overrides, opts: SweepOptions) -> list[Row]:
    from longscan.training.config import load_config
    rows: list[Row] = []
    for sp in opts.sp_sizes or (None,):
        if opts.seq_lens:
            rows += [attempt(cfg_path, overrides, sp, n, opts) for n in opts.seq_lens]
            continue
        cfg = load_config(cfg_path, overrides + ([f"parallel.sp={sp}"] if sp else []))

        def fits(n: int) -> bool:
            rows.append(attempt(cfg_path, overrides, sp, n, opts))
            return rows[-1].status == "ok"

        fit = longest_fit(cfg.data.seq_len, granule(cfg, cfg.parallel.sp), opts.max_len, fits)
        if dist.get_rank() == 0:
            print(f"{PROG}: sp {cfg.parallel.sp}: longest sequence that fits: {fit or 'none'}", flush=True)
    return rows


# ---- outputs ------------------------------------------------------------------------------------------------
def write_outputs(rows: list[Row], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["seq_len"])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")
    write_png(rows, os.path.join(out, "sweep.png"))


def markdown_table(rows: list[Row]) -> str:
    """Sequence length × GPUs: throughput and memory per GPU, or OOM (the form of LASP-2's Table 6)."""
    lines = ["| Sequence length | GPUs | SP | Throughput (tokens/s) | Tokens/s per GPU | MFU | Memory per GPU (GiB) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r.sp, r.seq_len)):
        if r.status != "ok":
            lines.append(f"| {r.seq_len:,} | {r.gpus} | {r.sp} | OOM | OOM | - | OOM |")
            continue
        mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        lines.append(f"| {r.seq_len:,} | {r.gpus} | {r.sp} | {r.tokens_per_s:,.0f} | {r.tokens_per_s_per_gpu:,.0f} | "
                     f"{mfu} | {r.peak_allocated_mb / 1024:.2f} |")
    return "\n".join(lines)


def write_png(rows: list[Row], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG}: sweep.png skipped: matplotlib is not installed (pip install matplotlib)", flush=True)
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for sp in sorted({r.sp for r in rows}):
        ok = sorted((r for r in rows if r.sp == sp and r.status == "ok"), key=lambda r: r.seq_len)
        a1.plot([r.seq_len for r in ok], [r.tokens_per_s_per_gpu for r in ok], "o-", label=f"SP {sp}")
        a2.plot([r.seq_len for r in ok], [r.peak_allocated_mb / 1024 for r in ok], "o-", label=f"SP {sp}")
        oom = [r.seq_len for r in rows if r.sp == sp and r.status == "oom"]
        if oom:
            a2.axvline(min(oom), linestyle=":", color="red")
    for ax, label in ((a1, "tokens/s per GPU"), (a2, "peak memory per GPU (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True

