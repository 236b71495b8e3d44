"""`longscan profile`: W warm-up steps, then N training steps with every collective and layer measured.

Outputs in ``--out``: summary.json (per rank and aggregated), trace.json (one Chrome/Perfetto trace, a process
lane per rank), profile.png (with matplotlib), and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longscan.observe.launch import NO_CHECKPOINTS, checked_overrides, launch, local_world, under_torchrun

PROG = "longscan profile"
MATPLOTLIB_HINT = "pip install matplotlib, or pip install longscan[plots]"


@dataclass(frozen=True)
class ProfileOptions:
    steps: int = 3
    warmup: int = 1
    out: str = "profile"
    compare_off: bool = False   # also time the steps with profiling off first (the profiler's overhead)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.out:
            raise ValueError("--out must name a directory")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Profile communication and compute of training steps.")
    p.add_argument("--config", default=None, help="YAML config (default: the embedded tiny CPU config)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unprofiled steps first (default 1)")
    p.add_argument("--out", default="profile", help="output directory (default ./profile)")
    p.add_argument("--compare-off", action="store_true",
                   help="first time --steps steps with profiling off, to report the profiler's overhead")
    p.add_argument("--nproc", type=int, default=0, help="processes when not under torchrun (default: GPUs, else 4)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for `longscan train`")
    return p


def cmd_profile(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    try:
        opts = ProfileOptions(a.steps, a.warmup, a.out, a.compare_off)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if not under_torchrun():
        nproc = a.nproc or local_world()
        overrides = checked_overrides(PROG, a.config, a.overrides, nproc)
        if overrides is None:
            return 2
        argv = ["profile", "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--out", opts.out]
        argv += ["--compare-off"] if opts.compare_off else []
        return launch(PROG, argv + (["--config", a.config] if a.config else []) + overrides, nproc)
    from longscan.training.config import load_config
    summary = run_profile(load_config(a.config, a.overrides + NO_CHECKPOINTS), opts)
    if summary is not None:
        print(format_table(summary), flush=True)
        print(f"wrote {opts.out}/summary.json, {opts.out}/trace.json"
              f"{', ' + opts.out + '/profile.png' if summary['png'] else ''}", flush=True)
    dist.destroy_process_group()
    return 0


# ---- one rank -----------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_rank(trainer, opts: ProfileOptions) -> tuple[dict, str]:
    """Run the steps on this rank -> (its report, its Chrome trace as text)."""
    from longscan.observe.recorder import StepObserver
    from longscan.training.metrics import memory_mb
    for _ in range(opts.warmup):
        trainer.train_step()
    off = []
    for _ in range(opts.steps if opts.compare_off else 0):   # nothing installed: what training pays
        _sync(trainer.device)
        t0 = time.perf_counter()
        trainer.train_step()
        _sync(trainer.device)
        off.append(time.perf_counter() - t0)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    obs = StepObserver(trainer)
    times = []
    try:
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(opts.steps):
                _sync(trainer.device)
                t0 = time.perf_counter()
                trainer.train_step()
                obs.rec.resolve()
                times.append(time.perf_counter() - t0)
    finally:
        obs.close()
    path = os.path.join(opts.out, f".trace_rank{trainer.ranks.rank}.json")
    os.makedirs(opts.out, exist_ok=True)
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = f.read()
    os.remove(path)
    rec = obs.rec
    report = {
        "rank": trainer.ranks.rank,
        "step_time_s": times,
        "unprofiled_step_time_s": off,
        "peak_mem_mb": memory_mb(trainer.device),
        "comm": [{"kind": k, "layer": layer, "calls": e.calls, "bytes_sent": e.bytes_sent,
                  "bytes_received": e.bytes_received, "time_s": e.time_s, "exposed_s": e.exposed_s}
                 for (k, layer), e in sorted(rec.comm.items())],
        "compute": [{"layer": name, "kind": e.kind, "time_s": rec.compute_s(name), "span_s": e.span_s}
                    for name, e in rec.compute.items()],
    }
    exposed = sum(c["exposed_s"] for c in report["comm"])
    report["exposed_comm_fraction"] = exposed / sum(times)
    return report, trace


def run_profile(cfg, opts: ProfileOptions) -> dict | None:
    """Build the trainer, profile, gather every rank's report to rank 0; rank 0 writes the outputs and gets the
    summary (None elsewhere)."""
    from longscan.training.trainer import Trainer
    trainer = Trainer(cfg)
    report, trace = profile_rank(trainer, opts)
    world = dist.get_world_size()
    gathered = [None] * world if trainer.ranks.rank == 0 else None
    dist.gather_object((report, trace), gathered, dst=0)
    if trainer.ranks.rank != 0:
        return None
    reports = [r for r, _ in gathered]
    summary = aggregate(reports, trainer, opts)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "trace.json"), "w") as f:
        json.dump(merge_traces([t for _, t in gathered]), f)
    summary["png"] = write_png(summary, os.path.join(opts.out, "profile.png"))
    with open(os.path.join(opts.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# ---- across ranks -------------------------------------------------------------------------------------------
def aggregate(reports: list[dict], trainer, opts: ProfileOptions) -> dict:
    """Bytes and calls summed over ranks; times the slowest rank's; compute by layer kind the mean over ranks."""
    from longscan.observe.flops import mfu
    comm: dict = {}
    for r in reports:
        for c in r["comm"]:
            e = comm.setdefault((c["kind"], c["layer"]), {"kind": c["kind"], "layer": c["layer"], "calls": 0,
                                                          "bytes_sent": 0, "bytes_received": 0, "time_s": 0.0,
                                                          "exposed_s": 0.0})
            for k in ("calls", "bytes_sent", "bytes_received"):
                e[k] += c[k]
            e["time_s"] = max(e["time_s"], c["time_s"])
            e["exposed_s"] = max(e["exposed_s"], c["exposed_s"])
    by_kind: dict = {}
    for r in reports:
        for c in r["compute"]:
            by_kind[c["kind"]] = by_kind.get(c["kind"], 0.0) + c["time_s"] / len(reports)
    step = sum(max(r["step_time_s"][i] for r in reports) for i in range(opts.steps)) / opts.steps
    off = (sum(max(r["unprofiled_step_time_s"][i] for r in reports) for i in range(opts.steps)) / opts.steps
           if opts.compare_off else None)
    c = trainer.cfg
    return {
        "world": len(reports), "steps": opts.steps, "warmup": opts.warmup,
        "parallel": {k: getattr(c.parallel, k) for k in ("tp", "pp", "sp", "dp", "layout", "linear_method",
                                                         "softmax_method")},
        "seq_len": c.data.seq_len, "global_batch_size": c.data.global_batch_size,
        "microbatches_per_rank": trainer.num_microbatches,
        "device": trainer.device.type if trainer.device.type != "cuda" else torch.cuda.get_device_name(),
        "step_time_s": step,
        "unprofiled_step_time_s": off,
        "profiler_overhead": None if off is None else step / off - 1,
        "tokens_per_s": trainer.tokens_per_step / step,
        "mfu": mfu(trainer.flops_per_step, step, len(reports), trainer.peak_flops),
        "exposed_comm_fraction": sum(r["exposed_comm_fraction"] for r in reports) / len(reports),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in reports),
        "compute_by_kind_s": by_kind,
        "comm": sorted(comm.values(), key=lambda e: (e["layer"], e["kind"])),
        "ranks": reports,
    }


def merge_traces(traces: list[str]) -> dict:
    """Every rank's Chrome trace in one, each rank its own process lane."""
    events = []
    for rank, text in enumerate(traces):
        data = json.loads(text)
        for e in data.get("traceEvents", []):
            if e.get("ph") == "M" and e.get("name") in ("process_name", "process_sort_index", "process_labels"):
                continue
            e["pid"] = rank
            events.append(e)
        events.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "args": {"sort_index": rank}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def layer_bars(summary: dict) -> list[tuple[str, float, float, float]]:
    """(layer, compute, hidden comm, exposed comm) seconds per step, means over the ranks holding the layer."""
    rows: dict = {}
    for r in summary["ranks"]:
        for c in r["compute"]:
            rows.setdefault(c["layer"], [0.0, 0.0, 0.0, 0])
            rows[c["layer"]][0] += c["time_s"]
            rows[c["layer"]][3] += 1
        for c in r["comm"]:
            if c["layer"] in rows:
                rows[c["layer"]][1] += c["time_s"] - c["exposed_s"]
                rows[c["layer"]][2] += c["exposed_s"]
    n = summary["steps"]
    return [(k, v[0] / v[3] / n, v[1] / v[3] / n, v[2] / v[3] / n) for k, v in rows.items() if v[3]]


def write_png(summary: dict, path: str) -> bool:
    """Stacked bar per layer (compute, hidden comm, exposed comm); False (with a hint) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG}: profile.png skipped: matplotlib is not installed ({MATPLOTLIB_HINT})", flush=True)
        return False
    bars = layer_bars(summary)
    names = [b[0] for b in bars]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(bars)), 4))
    bottom = [0.0] * len(bars)
    for i, (label, color) in enumerate((("compute", "tab:blue"), ("hidden comm", "tab:green"),
                                        ("exposed comm", "tab:red"))):
        vals = [1e3 * b[i + 1] for b in bars]
        ax.bar(names, vals, bottom=bottom, label=label, color=color)
        bottom = [x + y for x, y in zip(bottom, vals)]
    ax.set_ylabel("ms per step")
    ax.set_title(f"{summary['parallel']['linear_method']} + {summary['parallel']['softmax_method']}, "
                 f"world {summary['world']}, seq {summary['seq_len']}")
    ax.legend()
    plt.xticks(rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def format_table(s: dict) -> str:
    n, w = s["steps"], s["world"]
    lines = [f"longscan profile | world {w} | {s['parallel']} | seq {s['seq_len']} | {s['device']} | {n} steps",
             f"{'collective':<24} {'layer':<18} {'calls/rank/step':>15} {'MB sent/rank/step':>18} "
             f"{'MB recv/rank/step':>18} {'time ms':>9} {'exposed ms':>10}"]
    for e in s["comm"]:
        lines.append(f"{e['kind']:<24} {e['layer']:<18} {e['calls'] / w / n:>15.1f} "
                     f"{e['bytes_sent'] / w / n / 2**20:>18.3f} {e['bytes_received'] / w / n / 2**20:>18.3f} "
                     f"{1e3 * e['time_s'] / n:>9.2f} {1e3 * e['exposed_s'] / n:>10.2f}")
    lines.append("compute (ms/step, mean over ranks): " + ", ".join(
        f"{k} {1e3 * v / n:.2f}" for k, v in s["compute_by_kind_s"].items()))
    mfu = "n/a" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
    lines.append(f"step {1e3 * s['step_time_s']:.1f} ms | {s['tokens_per_s']:,.0f} tok/s | MFU {mfu} | exposed comm "
                 f"{100 * s['exposed_comm_fraction']:.1f}% of the step | peak mem {s['peak_mem_mb']:,.0f} MiB")
    if s["unprofiled_step_time_s"] is not None:
        lines.append(f"profiling off: step {1e3 * s['unprofiled_step_time_s']:.1f} ms; on: "
                     f"{1e3 * s['step_time_s']:.1f} ms (overhead {100 * s['profiler_overhead']:+.1f}%)")
    return "\n".join(lines)
