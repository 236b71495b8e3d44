"""Checks `longscan train` runs once, before starting processes, so a user sees one clear line instead of
one traceback per rank: the optional packages the config needs, and the token file against its metadata
and the model's vocabulary."""
from __future__ import annotations

import importlib.util

from longscan.training.config import ConfigError, TrainConfig
from longscan.training.data import open_token_file


def _need(module: str, what: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs the `{module}` package: pip install 'longscan[{extra}]'")


def check_dependencies(cfg: TrainConfig) -> None:
    """The optional packages this config imports somewhere in the workers."""
    p = cfg.parallel
    if cfg.logging.wandb_project:
        _need("wandb", f"logging.wandb_project = {cfg.logging.wandb_project!r}", "wandb")
    if cfg.optimizer.engine == "deepspeed":
        _need("deepspeed", "optimizer.engine = deepspeed", "deepspeed")
    if p.softmax_method == "ulysses" and "N" in cfg.model.pattern:
        _need("deepspeed", "parallel.softmax_method = ulysses", "deepspeed")
    if p.linear_backend == "triton":
        _need("triton", "parallel.linear_backend = triton", "triton")
    if p.softmax_backend == "triton" and "N" in cfg.model.pattern:
        _need("triton", "parallel.softmax_backend = triton", "triton")
    if p.linear_backend == "fla":
        _need("fla", "parallel.linear_backend = fla", "fla")


def check_data(cfg: TrainConfig) -> None:
    """A token file that matches its metadata (sampled ids) and fits the model's vocabulary."""
    if cfg.data.source != "tokens":
        return
    _, meta = open_token_file(cfg.data.path)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the vocabulary of "
                          f"{cfg.data.path} ({meta['vocab_size']}); set model.vocab_size={meta['vocab_size']}")


def check_before_launch(cfg: TrainConfig) -> None:
    """Raise ConfigError / DataError (one line each) for what would otherwise fail inside every worker."""
    check_dependencies(cfg)
    check_data(cfg)
