"""`longscan` command line.

  longscan train [--config FILE] [--nproc N] [section.key=value ...]
  longscan prepare-data --output FILE [--tokenizer tokenizer.json] [--suffix .py,.txt] INPUT [INPUT ...]
  longscan config [--config FILE] [section.key=value ...]      (print the resolved config)

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
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.sp=2 model.n_layers=8")
    return p


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _local_world() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else CPU_PROCESSES


def cmd_train(argv: list[str]) -> int:
    args = _train_parser().parse_args(argv)
    if _under_torchrun():  # a rank: started by the launcher below or by torchrun
        from longscan.training.entry import run_rank
        return run_rank(args.config, args.overrides)
    from longscan.training.launcher import LaunchOptions, run_launcher, usage_error
    try:
        opts = LaunchOptions(nproc=args.nproc or _local_world(), nnodes=args.nnodes, node_rank=args.node_rank,
                             master_addr=args.master_addr, master_port=args.master_port,
                             rdzv_timeout_s=args.rdzv_timeout, stop_timeout_s=args.stop_timeout)
    except ValueError as e:
        return usage_error(str(e))
    return run_launcher(opts, args.config, list(args.overrides))


def cmd_prepare_data(argv: list[str]) -> int:
    from longscan.training.data import DataError, prepare_data
    p = argparse.ArgumentParser(prog="longscan prepare-data",
                                description="Tokenise text files into a memory-mapped token file.")
    p.add_argument("inputs", nargs="+", help="text files or directories (searched recursively, sorted)")
    p.add_argument("--output", required=True, help="token file to write (metadata goes to OUTPUT.json)")
    p.add_argument("--tokenizer", default=None, help="a `tokenizers` tokenizer.json (default: byte-level)")
    p.add_argument("--suffix", default="", help="comma-separated file suffixes to keep in directories")
    a = p.parse_args(argv)
    try:
        meta = prepare_data(a.inputs, a.output, a.tokenizer, tuple(s for s in a.suffix.split(",") if s))
    except DataError as e:
        print(f"longscan prepare-data: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}: {meta['num_tokens']:,} tokens from {meta['files']} files "
          f"({meta['dtype']}, vocab {meta['vocab_size']}, eos {meta['eos']}); train with "
          f"data.source=tokens data.path={a.output} model.vocab_size={meta['vocab_size']}")
    return 0


def cmd_config(argv: list[str]) -> int:
    import yaml
    from longscan.training.config import ConfigError, load_config
    p = argparse.ArgumentParser(prog="longscan config", description="Print the resolved config as YAML.")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        print(yaml.safe_dump(load_config(a.config, a.overrides).to_dict(), sort_keys=False), end="")
    except ConfigError as e:
        print(f"longscan config: {e}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {"train": cmd_train, "prepare-data": cmd_prepare_data, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
