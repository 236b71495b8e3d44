"""`longscan` command line.

  longscan train [--config FILE] [--nproc N] [section.key=value ...]
  longscan prepare-data --output FILE [--tokenizer tokenizer.json] [--suffix .py,.txt] [--jsonl-field text]
                        [--shard-tokens N] INPUT [INPUT ...]   (text, .jsonl, .parquet, saved HF datasets)
  longscan config [--config FILE] [section.key=value ...]      (print the resolved config)
  longscan export --checkpoint DIR/step_N --output model.safetensors [--config FILE] [overrides]
  longscan verify [--nproc N] [--methods ...] [--layouts ...] [--kinds ...]  (every SP operator against one device)
  longscan profile|sweep|plan ...   (communication per layer, sequence-length scaling, a cost model: --help)

Under torchrun (RANK/WORLD_SIZE set) `train` runs as the launched rank. Started plainly it launches
itself with torch.distributed.run over every local GPU (NCCL), or over 4 CPU processes (gloo) when there
is no GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

# megatron-core warns at import time on machines without Transformer Engine / Apex; it then uses torch.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")

CPU_PROCESSES = 4


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longscan train", description="Train the hybrid LM (see configs/).")
    p.add_argument("--config", default=None, help="YAML config (default: the embedded tiny CPU config)")
    p.add_argument("--nproc", type=int, default=0,
                   help="processes to start when not under torchrun (default: GPUs, else 4 CPU processes)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.sp=2 model.n_layers=8")
    return p


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _local_world() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else CPU_PROCESSES


def cmd_train(argv: list[str]) -> int:
    from longscan.training.config import ConfigError, load_config, validate
    args = _train_parser().parse_intermixed_args(argv)  # overrides before or after options
    if not _under_torchrun():
        nproc = args.nproc or _local_world()
        overrides = list(args.overrides)
        if args.config is None and not any(o.startswith("parallel.") for o in overrides):
            # The embedded default asks for SP 2; on one GPU it runs unsplit rather than not at all.
            try:
                p = load_config(None, overrides).parallel
            except ConfigError:
                p = None  # reported below
            if p is not None and nproc % (p.tp * p.pp * p.sp):
                print(f"longscan train: {nproc} process(es) cannot hold tp·pp·sp = {p.tp * p.pp * p.sp} of the "
                      "default config; running it with parallel.tp=1 parallel.pp=1 parallel.sp=1", flush=True)
                overrides += ["parallel.tp=1", "parallel.pp=1", "parallel.sp=1"]
        args.overrides = overrides
        from longscan.training.data import DataError, open_token_file
        from longscan.training.preflight import check_before_launch
        try:  # fail here, once, before starting processes
            cfg = validate(load_config(args.config, args.overrides), nproc)
            check_before_launch(cfg)
            if cfg.data.source == "tokens":
                open_token_file(cfg.data.path)
        except (ConfigError, DataError) as e:
            print(f"longscan train: {'config' if isinstance(e, ConfigError) else 'data'} error: {e}",
                  file=sys.stderr)
            return 2
        from torch.distributed.run import get_args_parser, run
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        launch = ["--standalone", f"--nproc-per-node={nproc}", "--module", "longscan.cli", "train"]
        if args.config:
            launch += ["--config", args.config]
        try:
            run(get_args_parser().parse_args(launch + list(args.overrides)))
        except Exception as e:  # torchrun already printed the failing rank's traceback
            print(f"longscan train: {type(e).__name__}: {str(e)[:2000]}", file=sys.stderr)
            return 1
        return 0
    from longscan.training.data import DataError
    from longscan.training.trainer import Trainer
    try:
        trainer = Trainer(load_config(args.config, args.overrides))
    except (ConfigError, DataError) as e:
        if int(os.environ["RANK"]) == 0:
            print(f"longscan train: {'config' if isinstance(e, ConfigError) else 'data'} error: {e}",
                  file=sys.stderr)
        return 2
    history = trainer.train()
    if trainer.ranks.is_log_rank and history["train"]:
        first, last = history["train"][0][1], history["train"][-1][1]
        val = " -> ".join(f"{v:.4f}" for _, v in history["val"])
        print(f"done: train loss {first:.4f} -> {last:.4f}; val loss {val}", flush=True)
    import torch.distributed as dist
    dist.destroy_process_group()
    return 0


def cmd_prepare_data(argv: list[str]) -> int:
    from longscan.training.prepare import cmd_prepare_data as run
    return run(argv)


def cmd_config(argv: list[str]) -> int:
    import yaml
    from longscan.training.config import ConfigError, load_config
    p = argparse.ArgumentParser(prog="longscan config", description="Print the resolved config as YAML.")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)  # overrides before or after --config
    try:
        print(yaml.safe_dump(load_config(a.config, a.overrides).to_dict(), sort_keys=False), end="")
    except ConfigError as e:
        print(f"longscan config: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_export(argv: list[str]) -> int:
    from longscan.training.export import cmd_export as run
    return run(argv)


def cmd_verify(argv: list[str]) -> int:
    from longscan.verify import main as run   # docs/verify.md
    return run(argv)


def cmd_profile(argv: list[str]) -> int:
    from longscan.observe.profile import cmd_profile as run   # communication and compute per layer
    return run(argv)


def cmd_sweep(argv: list[str]) -> int:
    from longscan.observe.sweep import cmd_sweep as run   # sequence-length scaling
    return run(argv)


def cmd_plan(argv: list[str]) -> int:
    from longscan.observe.plan import cmd_plan as run   # the cost model
    return run(argv)


COMMANDS = {"train": cmd_train, "prepare-data": cmd_prepare_data, "config": cmd_config, "export": cmd_export,
            "verify": cmd_verify, "profile": cmd_profile, "sweep": cmd_sweep, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
