"""Training steps of the 1B hybrid on one GPU at long sequences: tokens/s, peak memory, the estimator beside it.

One process, SP = 1: for each linear variant the model and AdamW are built once, then each sequence length
runs ``--warmup`` + ``--steps`` optimizer steps (forward, backward, AdamW; bf16 autocast on CUDA) on random
tokens. tokens/s is the length over the mean wall time of the ``--steps`` timed steps, from the first one's
start to the last one's loss on the host; warm-up steps are not timed (``--warmup-seq-len``: they run at that
length instead, which compiles the kernels and creates AdamW's states at a fraction of a long step's time).
Host memory of offloaded activations: what the forward's stash holds at its end (every offloaded input), and
on CUDA the peak of pinned blocks handed out by torch's host allocator during the timed steps (under
memory.pinned = exact: the peak the model's pool held page-locked, and its page-locking seconds). Out of memory
is caught, the step's memory freed, and the next length tried. ``--max`` searches the longest length that
fits (doubling from the first length, then bisecting to ``--granularity``). Prints a markdown table.

    PYTHONPATH=. python benchmarks/train_memory.py                               # 16K, 64K, 256K, 1M
    PYTHONPATH=. python benchmarks/train_memory.py memory.loss_chunk=8192 memory.mlp_tile=16384 \\
        memory.linear_layers=offload memory.softmax_layers=offload memory.mlp=offload \\
        schedule.activation_checkpointing=false --max
    PYTHONPATH=. python benchmarks/train_memory.py --config configs/hybrid_1b_1m.yaml --variants lightning \
        --seq-lens 262144 524288 786432 1048576 --steps 1 --breakdown        # the 1M config, every option on
    PYTHONPATH=. python benchmarks/train_memory.py --config configs/hybrid_1b_1m.yaml --variants lightning \
        --seq-lens 1048576 --steps 1 --warmup 1 --warmup-seq-len 65536 --breakdown  # one timed 1M step
    python benchmarks/train_memory.py --tiny --seq-lens 64 128                   # the CPU path (a tiny model)

Overrides (section.key=value) apply to the config as in `longscan train`; parallel.* are forced to 1.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

from longscan.models.model import HybridLM, SPSpec
from longscan.observe.flops import device_peak_flops, mfu, step_flops
from longscan.training.config import load_config
from longscan.training.memory import Estimate, GiB, Layout, estimate
from longscan.training.offload import stashes_in_graph
from longscan.training.optim import build_adamw
from longscan.training.parallel import init_groups, stage_config

TINY = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=512",
        "model.pad_vocab_to=64"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/hybrid_1b_gpu.yaml")
    p.add_argument("--variants", nargs="+", default=["lightning", "gla"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[16384, 65536, 262144, 1048576])
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps a length")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before the timed ones")
    p.add_argument("--warmup-seq-len", type=int, default=0,
                   help="tokens of each warm-up step (0: the length being measured)")
    p.add_argument("--max", action="store_true", help="search the longest length that fits")
    p.add_argument("--max-len", type=int, default=1 << 24, help="--max stops doubling here")
    p.add_argument("--granularity", type=int, default=8192, help="--max bisects to a multiple of this")
    p.add_argument("--tiny", action="store_true", help="a tiny model (the CPU path)")
    p.add_argument("--breakdown", action="store_true", help="print the prediction's breakdown for each length")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    a = p.parse_args(argv)
    if a.tiny:
        a.config = None
        a.overrides = TINY + a.overrides
        a.granularity = min(a.granularity, 64)
    return a


def setup() -> torch.device:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    init_groups(1, 1, 1)
    return torch.device("cuda") if cuda else torch.device("cpu")


class Runner:
    """One variant's model and optimizer; ``run(T)`` -> a result row."""

    def __init__(self, cfg, device: torch.device, warmup_len: int = 0):
        self.cfg, self.device, self.warmup_len = cfg, device, warmup_len
        precision = cfg.schedule.precision  # auto: bf16 autocast on CUDA, float32 on CPU (as `longscan train`)
        self.bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        p = cfg.parallel
        mp = stage_config(1, 1, 1, cfg.model.dim, torch.bfloat16 if self.bf16 else torch.float32)
        sp = SPSpec(group=None, layout=p.layout, linear_backend=p.linear_backend, softmax_backend=p.softmax_backend)
        self.model = HybridLM(cfg.model, mp, sp, seed=0, activation_checkpointing=cfg.schedule.activation_checkpointing,
                              memory=cfg.memory.options()).to(device)
        self.optimizer = build_adamw(self.model, cfg.optimizer)
        self.params = sum(q.numel() for q in self.model.parameters())

    def _step(self, tokens):
        """One optimizer step; -> (its loss, the host bytes its offloaded inputs held at the forward's end)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(tokens[:, :-1], tokens[:, 1:]).mean()
        held = sum(s.held_bytes for s in stashes_in_graph(loss))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), held

    def estimate(self, T: int) -> Estimate:
        c = self.cfg
        return estimate(c.model, Layout(seq_len=T), c.memory.options(), bf16=self.bf16,
                        whole_block_checkpointing=c.schedule.activation_checkpointing)

    def run(self, T: int, steps: int, warmup: int) -> dict:
        est = self.estimate(T)
        row = {"seq_len": T, "predicted": est.peak / GiB, "predicted_host": est.host_bytes / GiB}
        cuda = self.device.type == "cuda"
        tokens = torch.randint(0, self.cfg.model.vocab_size, (1, T + 1), device=self.device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            W = self.warmup_len or T
            warm = tokens if W == T else torch.randint(0, self.cfg.model.vocab_size, (1, W + 1), device=self.device)
            for _ in range(warmup):
                self._step(warm)
            del warm
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # a shorter warm-up's cached blocks do not crowd the timed steps
                torch.cuda.reset_peak_host_memory_stats()  # the pinned blocks of the timed steps only
                torch.cuda.reset_accumulated_host_memory_stats()
            if self.model.host_pool is not None:  # memory.pinned = exact: the model's pool, not torch's allocator
                self.model.host_pool.reset_peak()
            t0 = time.perf_counter()
            for _ in range(steps):
                loss, held = self._step(tokens)
            float(loss)  # waits for the last step
            dt = (time.perf_counter() - t0) / steps
            row.update(status="ok", tokens_per_s=T / dt, loss=float(loss), step_s=dt, host=held / GiB,
                       mfu=mfu(step_flops(self.cfg.model, 1, T), dt, 1, device_peak_flops(self.device)))
            pool = self.model.host_pool
            if pool is not None:  # exactly-sized buffers page-locked by the pool (on CPU: not page-locked)
                row.update(pinned=pool.peak_registered_bytes / GiB, pinned_alloc_s=pool.register_seconds)
            elif cuda:  # new pinned blocks are page-locked on the host thread, inside the timed steps
                stats = torch.cuda.host_memory_stats()
                row.update(pinned=stats.get("active_bytes.peak", 0) / GiB,
                           pinned_alloc_s=stats.get("host_alloc_time.total", 0) / 1e6)
        except torch.OutOfMemoryError:
            row.update(status="OOM")
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            del tokens
            gc.collect()
        if cuda:
            row.update(allocated=torch.cuda.max_memory_allocated() / GiB,
                       reserved=torch.cuda.max_memory_reserved() / GiB)
            torch.cuda.empty_cache()
        return row


def search_max(runner: Runner, start: int, args) -> tuple[int, list[dict]]:
    """The longest length that fits: double from ``start`` until one fails, then bisect."""
    rows, good, bad, T = [], 0, None, start
    while T <= args.max_len:
        row = runner.run(T, 1, 1)
        rows.append(row)
        if row["status"] != "ok":
            bad = T
            break
        good, T = T, T * 2
    if bad is None:
        return good, rows
    g = args.granularity
    while bad - good > g:
        mid = (good + bad) // 2 // g * g
        if mid <= good:
            break
        row = runner.run(mid, 1, 1)
        rows.append(row)
        good, bad = (mid, bad) if row["status"] == "ok" else (good, mid)
    return good, rows


def fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    """One row a length; host: the offloaded inputs' bytes at the forward's end, pinned: the host allocator's
    peak of pinned blocks handed out (CUDA), predicted host: the estimator's; pinned alloc s: the seconds the
    timed steps spent page-locking new host blocks (a first step at a length pays them, later steps reuse)."""
    out = ["| variant | seq len | tokens/s | MFU | step s | max allocated GiB | max reserved GiB | predicted GiB | "
           "host GiB | pinned GiB | predicted host GiB | pinned alloc s | status |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m = r.get("mfu")
        out.append(f"| {r['variant']} | {r['seq_len']:,} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                   f"{'—' if m is None else f'{100 * m:.1f}%'} | {fmt(r.get('step_s'), '.1f')} | "
                   f"{fmt(r.get('allocated'), '.2f')} | {fmt(r.get('reserved'), '.2f')} | {r['predicted']:.2f} | "
                   f"{fmt(r.get('host'), '.4g')} | {fmt(r.get('pinned'), '.4g')} | "
                   f"{fmt(r.get('predicted_host'), '.4g')} | {fmt(r.get('pinned_alloc_s'), '.1f')} | {r['status']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    device = setup()
    rows, longest = [], {}
    for variant in args.variants:
        over = args.overrides + [f"model.linear_variant={variant}", "parallel.tp=1", "parallel.pp=1", "parallel.sp=1",
                                 "parallel.dp=1"]
        cfg = load_config(args.config, over)
        runner = Runner(cfg, device, args.warmup_seq_len)
        print(f"{variant}: {runner.params:,} parameters, {device.type}", flush=True)
        if args.max:
            longest[variant], found = search_max(runner, args.seq_lens[0], args)
            rows += [dict(r, variant=variant) for r in found]
        else:
            for T in args.seq_lens:
                rows.append(dict(runner.run(T, args.steps, args.warmup), variant=variant))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                if args.breakdown:
                    print(f"predicted at {T:,} tokens ({variant}):\n{runner.estimate(T).table()}", flush=True)
        del runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))
    for variant, T in longest.items():
        print(f"longest that fits ({variant}): {T:,} tokens" + (" (--max-len reached)" if T * 2 > args.max_len else ""))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
