"""Starting `profile` and `sweep` the way `longscan train` starts: checked once, then torch.distributed.run over
every local GPU (NCCL) or 4 CPU processes (gloo), each rank running the same command under torchrun."""
from __future__ import annotations

import os
import sys

CPU_PROCESSES = 4


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_world() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else CPU_PROCESSES


# measuring tools neither resume from nor write into (or lock) the run's checkpoint directory
NO_CHECKPOINTS = ["checkpoint.dir="]


def checked_overrides(prog: str, config: str | None, overrides: list[str], nproc: int) -> list[str] | None:
    """The overrides to launch with (the default config made to fit ``nproc`` as `train` does), or None after
    printing the config/data error."""
    from longscan.training.config import ConfigError, load_config, validate
    from longscan.training.data import DataError, open_token_file
    overrides = list(overrides)
    if config is None and not any(o.startswith("parallel.") for o in overrides):
        try:
            p = load_config(None, overrides).parallel
        except ConfigError:
            p = None
        if p is not None and nproc % (p.tp * p.pp * p.sp):
            print(f"{prog}: {nproc} process(es) cannot hold tp·pp·sp = {p.tp * p.pp * p.sp} of the default config; "
                  "running it with parallel.tp=1 parallel.pp=1 parallel.sp=1", flush=True)
            overrides += ["parallel.tp=1", "parallel.pp=1", "parallel.sp=1"]
    try:
        cfg = validate(load_config(config, overrides), nproc)
        if cfg.data.source == "tokens":
            open_token_file(cfg.data.path)
    except (ConfigError, DataError) as e:
        print(f"{prog}: {'config' if isinstance(e, ConfigError) else 'data'} error: {e}", file=sys.stderr)
        return None
    return overrides


def launch(prog: str, command_argv: list[str], nproc: int) -> int:
    """Run ``longscan <command_argv>`` in ``nproc`` processes under torch.distributed.run."""
    from torch.distributed.run import get_args_parser, run
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = ["--standalone", f"--nproc-per-node={nproc}", "--module", "longscan.cli"] + command_argv
    try:
        run(get_args_parser().parse_args(args))
    except Exception as e:  # torchrun already printed the failing rank's traceback
        print(f"{prog}: {type(e).__name__}: {str(e)[:2000]}", file=sys.stderr)
        return 1
    return 0
