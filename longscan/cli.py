"""`longscan` command line.

  longscan train [--config FILE] [--nproc N] [section.key=value ...]
  longscan prepare-data --output FILE [--tokenizer tokenizer.json] [--suffix .py,.txt] [--jsonl-field text]
                        [--shard-tokens N] INPUT [INPUT ...]   (text, .jsonl, .parquet, saved HF datasets)
  longscan config [--config FILE] [section.key=value ...]      (print the resolved config)
  longscan export --checkpoint DIR/step_N --output model.safetensors [--config FILE] [overrides]
  longscan verify [--nproc N] [--methods ...] [--layouts ...] [--kinds ...]  (every SP operator against one device)
  longscan profile|sweep|plan ...   (communication per layer, sequence-length scaling, a cost model: --help)

Under torchrun (RANK/WORLD_SIZE set) `train` runs as a rank (longscan.training.entry). Started plainly it
is the launcher (longscan.training.launcher): one rank process per local GPU (NCCL), or 4 CPU processes
(gloo) when there is no GPU; `--nnodes/--node-rank/--master-addr/--master-port` on every node of a
multi-node run.
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
                   help="processes to start on this node (default: its GPUs, else 4 CPU processes)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of the run (start `longscan train` on each)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index in [0, nnodes)")
    p.add_argument("--master-addr", default="", help="host of node 0 (multi-node; default: this host)")
    p.add_argument("--master-port", type=int, default=0, help="free port on node 0 (multi-node; default: any)")
    p.add_argument("--rdzv-timeout", type=float, default=900.0,
                   help="seconds to wait for every node before failing (default 900)")
    p.add_argument("--stop-timeout", type=float, default=600.0,
                   help="seconds ranks get to stop (and save) after SIGTERM/SIGINT/SIGUSR1 before being killed")
    p.add_argument("--failure-grace", type=float, default=10.0,
                   help="seconds the other ranks get to report after one fails, before being killed (default 10)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.sp=2 model.n_layers=8")
    return p


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _local_world() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else CPU_PROCESSES


def cmd_train(argv: list[str]) -> int:
    args = _train_parser().parse_intermixed_args(argv)  # overrides before or after options
    if _under_torchrun():  # a rank: started by the launcher below or by torchrun
        from longscan.training.entry import run_rank
        return run_rank(args.config, args.overrides)
    from longscan.training.launcher import LaunchOptions, run_launcher, usage_error
    try:
        opts = LaunchOptions(nproc=args.nproc or _local_world(), nnodes=args.nnodes, node_rank=args.node_rank,
                             master_addr=args.master_addr, master_port=args.master_port,
                             rdzv_timeout_s=args.rdzv_timeout, stop_timeout_s=args.stop_timeout,
                             failure_grace_s=args.failure_grace)
    except ValueError as e:
        return usage_error(str(e))
    return run_launcher(opts, args.config, list(args.overrides))


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
