"""Unit: config loading, overrides and validation errors name the key and the allowed values."""
from __future__ import annotations

import glob
import os

import pytest

from longscan.training.config import ConfigError, TrainConfig, load_config, parse_overrides, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_embedded_default_loads_and_fits_four_processes():
    cfg = validate(load_config(), 4)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sp, cfg.parallel.dp) == (1, 1, 2, 2)
    assert cfg.data.source == "stdlib"


def test_overrides_are_typed_and_dotted():
    cfg = load_config(None, ["model.n_layers=8", "parallel.sp=4", "optimizer.lr=1e-4",
                             "schedule.activation_checkpointing=true", "parallel.layout=contiguous"])
    assert cfg.model.n_layers == 8 and cfg.parallel.sp == 4 and cfg.optimizer.lr == 1e-4
    assert cfg.schedule.activation_checkpointing is True and cfg.parallel.layout == "contiguous"
    assert parse_overrides(["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}
    assert load_config().parallel.linear_overlap is False
    assert load_config(None, ["parallel.linear_overlap=true"]).parallel.linear_overlap is True


@pytest.mark.parametrize("overrides, world, message", [
    (["model.nlayers=3"], 1, "unknown config key 'model.nlayers'; allowed: "),
    (["modle.dim=3"], 1, "unknown config key 'modle'; allowed: checkpoint, data, logging, memory, model"),
    (["model.dim=big"], 1, "model.dim must be an integer"),
    (["parallel.sp"], 1, "must look like section.key=value"),
    (["parallel.tp=3", "parallel.sp=1"], 3, "model.n_heads = 4 is not divisible by parallel.tp = 3"),
    (["parallel.sp=2", "parallel.dp=1"], 4, "world size 4 != tp·pp·sp·dp = 1·1·2·1 = 2"),
    (["parallel.sp=3"], 4, "world size 4 is not divisible by tp·pp·sp"),
    (["parallel.sp=4", "data.seq_len=100"], 4, "data.seq_len = 100 must divide into 8 pieces for layout='zigzag'"),
    (["parallel.linear_method=ring"], 4, "parallel.linear_method = 'ring' is not allowed; choose one of zeco, lasp2, lasp1"),
    (["parallel.softmax_method=flash"], 4, "choose one of ring, allgather, ulysses"),
    (["model.linear_variant=mamba"], 4, "choose one of linear, lightning, simple_gla, gla"),
    (["parallel.layout=striped"], 4, "choose one of contiguous, zigzag"),
    (["model.pattern=LLX"], 4, "model.pattern = 'LLX' must be a non-empty string of L"),
    (["parallel.pp=3", "parallel.sp=1", "model.n_layers=4"], 3, "model.n_layers = 4 is not divisible by parallel.pp = 3"),
    (["data.global_batch_size=6"], 8, "data.global_batch_size = 6 is not divisible by data.micro_batch_size · dp"),
    (["parallel.tp=2", "parallel.sp=1", "model.n_kv_heads=1"], 2, "model.n_kv_heads = 1 is not divisible by parallel.tp = 2"),
    (["data.source=tokens"], 4, "data.source = tokens needs data.path"),
    (["optimizer.engine=deepspeed", "optimizer.zero_stage=2"], 4, "optimizer.zero_stage = 2 is not allowed; choose 1"),
    (["optimizer.engine=zero"], 4, "optimizer.engine = 'zero' is not allowed; choose one of torch, deepspeed"),
    (["parallel.linear_overlap=3"], 4, "parallel.linear_overlap"),
])
def test_bad_configs_raise_clear_errors(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, overrides), world)
    assert message in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: /nope.yaml"):
        load_config("/nope.yaml")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_example_configs_validate(path):
    cfg = load_config(path)
    p = cfg.parallel
    validate(cfg, p.tp * p.pp * p.sp * max(p.dp, 1))
