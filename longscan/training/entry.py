"""The rank entry of `longscan train`: one process of the run, started by the launcher or torchrun.

It arms the parent-death exit and the stop-signal record, meets the other ranks (when started by the
launcher), trains, and turns what ended the run into an exit code (see lifecycle) and one clear line.
"""
from __future__ import annotations

import os
import sys
import traceback

from longscan.training.lifecycle import (EXIT_COLLECTIVE_TIMEOUT, EXIT_DIVERGED, EXIT_FAILED, EXIT_RENDEZVOUS,
                                         EXIT_USAGE, StopRequest, exit_code_for, watch_parent)

LAUNCHER_PID_ENV = "LONGSCAN_LAUNCHER_PID"
RDZV_TIMEOUT_ENV = "LONGSCAN_RDZV_TIMEOUT"


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "timeout" in text)


def _suspects(heartbeat) -> str:
    if heartbeat is None:
        return "a peer rank is stopped, dead or far slower"
    silent = heartbeat.silent_ranks()
    if silent is None:
        return "rank 0, which serves the rendezvous store, does not answer: it is stopped or dead"
    if silent:
        return f"not responding (stopped or dead): rank {', '.join(map(str, silent))}"
    return "every rank is alive: a peer is far slower or waits in another collective"


def run_rank(config: str | None, overrides: list[str]) -> int:
    """Train as rank RANK of WORLD_SIZE (environment); returns the process exit code."""
    from longscan.training.checkpoint import CheckpointError
    from longscan.training.config import ConfigError, load_config, validate
    from longscan.training.memory import check_capacity
    from longscan.training.data import DataError
    from longscan.training.lock import LockError
    from longscan.training.parallel import collective_timeout_s, init_process_group
    from longscan.training.rendezvous import RendezvousError, RendezvousOptions, rendezvous
    from longscan.training.trainer import Trainer, TrainingDiverged

    rank = int(os.environ["RANK"])
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    # Under torchrun the parent is its agent: the workers leave with it just the same.
    watch_parent(int(launcher) if launcher else os.getppid(), rank)
    stop = StopRequest().install()
    trainer = None
    heartbeat = None

    def say(msg: str, all_ranks: bool = False) -> None:
        if all_ranks or rank == 0:
            print(f"longscan train: {msg}", file=sys.stderr, flush=True)

    try:
        cfg = load_config(config, overrides)
        world = int(os.environ["WORLD_SIZE"])
        check_capacity(validate(cfg, world), world)  # under a plain torchrun too, before any GPU work
        if launcher:  # our launcher leaves the rendezvous to the ranks, so that they can report on it
            timeout = float(os.environ[RDZV_TIMEOUT_ENV])
            store = rendezvous(RendezvousOptions(
                master_addr=os.environ["MASTER_ADDR"], master_port=int(os.environ["MASTER_PORT"]), rank=rank,
                world_size=int(os.environ["WORLD_SIZE"]), local_rank=int(os.environ["LOCAL_RANK"]),
                nproc_per_node=int(os.environ["LOCAL_WORLD_SIZE"]), timeout_s=timeout,
                report_every_s=min(10.0, timeout / 4)))
            init_process_group(cfg.parallel.timeout_s, store)
            from longscan.training.heartbeat import Heartbeat
            heartbeat = Heartbeat(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank,
                                  int(os.environ["WORLD_SIZE"]))
        trainer = Trainer(cfg, stop)
        history = trainer.train()
    except (ConfigError, DataError, LockError, CheckpointError) as e:  # every rank raises the same one
        kind = {ConfigError: "config", DataError: "data", LockError: "checkpoint.dir"}.get(type(e), "checkpoint")
        say(f"{kind} error: {e}")
        return EXIT_USAGE
    except RendezvousError as e:
        say(str(e), all_ranks=int(os.environ.get("LOCAL_RANK", "0")) == 0)
        return EXIT_RENDEZVOUS
    except TrainingDiverged as e:
        say(str(e))
        return EXIT_DIVERGED
    except Exception as e:
        if _is_timeout(e):
            import torch
            device = trainer.device if trainer is not None else torch.device("cpu")
            timeout = collective_timeout_s(cfg.parallel.timeout_s, device)
            activity = trainer.activity if trainer is not None else "startup (process groups, data, resume)"
            say(f"rank {rank}: a collective timed out after {timeout:g} s (parallel.timeout_s) during {activity}; "
                f"{_suspects(heartbeat)}. ({type(e).__name__}: {str(e)[:300]})", all_ranks=True)
            return EXIT_COLLECTIVE_TIMEOUT
        say(f"rank {rank} failed:\n{traceback.format_exc()}", all_ranks=True)
        return EXIT_FAILED
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if trainer is not None:
            trainer.close()
    if trainer.ranks.is_log_rank and history["train"]:
        first, last = history["train"][0][1], history["train"][-1][1]
        val = " -> ".join(f"{v:.4f}" for _, v in history["val"])
        verb = f"stopped by {trainer.stop_signal.name}" if trainer.stop_signal else "done"
        print(f"{verb}: train loss {first:.4f} -> {last:.4f}; val loss {val}", flush=True)
    import torch.distributed as dist
    dist.destroy_process_group()
    return exit_code_for(trainer.stop_signal) if trainer.stop_signal else 0
