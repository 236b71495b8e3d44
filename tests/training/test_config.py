"""Unit: config loading, overrides and validation errors name the key and the allowed values."""
from __future__ import annotations

import glob
import json
import os
import re

import pytest
import yaml

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
    (["modle.dim=3"], 1, "unknown config key 'modle'; allowed: checkpoint, data, kernels, logging, memory, model"),
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


@pytest.mark.parametrize("overrides, message", [
    (["model.n_layers=0"], "model.n_layers must be >= 1, got 0"),
    (["model.dim=-8"], "model.dim must be >= 1, got -8"),
    (["model.n_heads=0"], "model.n_heads must be >= 1, got 0"),
    (["model.pad_vocab_to=0"], "model.pad_vocab_to must be >= 1, got 0"),
    (["model.vocab_size=0"], "model.vocab_size must be >= 1, got 0"),
    (["model.head_dim=-2"], "model.head_dim must be >= 0"),
    (["model.dim=100", "model.n_heads=3"], "model.dim = 100 is not divisible by model.n_heads = 3"),
    (["model.n_kv_heads=3"], "model.n_heads = 4 is not divisible by model.n_kv_heads = 3"),
    (["model.norm_eps=.nan"], "model.norm_eps must be a finite number > 0, got nan"),
    (["model.rope_theta=-1.0"], "model.rope_theta must be a finite number > 0"),
    (["parallel.sp=0"], "parallel.sp must be >= 1, got 0"),
    (["parallel.dp=-1"], "parallel.dp must be >= 0, got -1"),
    (["parallel.linear_backend=cuda"], "parallel.linear_backend = 'cuda' is not allowed; choose one of auto, naive"),
    (["parallel.softmax_backend=flash"], "parallel.softmax_backend = 'flash' is not allowed; choose one of auto"),
    (["data.seq_len=0"], "data.seq_len must be >= 1, got 0"),
    (["data.global_batch_size=0"], "data.global_batch_size must be >= 1, got 0"),
    (["data.micro_batch_size=-1"], "data.micro_batch_size must be >= 1, got -1"),
    (["data.seed=-1"], "data.seed must be >= 0, got -1"),
    (["data.val_fraction=.nan"], "data.val_fraction must be a finite number in (0, 1), got nan"),
    (["optimizer.lr=.nan"], "optimizer.lr must be a finite number in (0, inf), got nan"),
    (["optimizer.lr=.inf"], "optimizer.lr must be a finite number in (0, inf), got inf"),
    (["optimizer.lr=0"], "optimizer.lr must be a finite number in (0, inf), got 0.0"),
    (["optimizer.beta2=1.0"], "optimizer.beta2 must be a finite number in [0, 1), got 1.0"),
    (["optimizer.grad_clip=-1"], "optimizer.grad_clip must be a finite number in [0, inf)"),
    (["optimizer.min_lr_ratio=2"], "optimizer.min_lr_ratio must be a finite number in [0, 1]"),
    (["schedule.steps=0"], "schedule.steps must be >= 1, got 0"),
    (["schedule.warmup_steps=-1"], "schedule.warmup_steps must be >= 0, got -1"),
    (["schedule.val_batches=0"], "schedule.val_batches must be >= 1, got 0"),
    (["schedule.precision=fp16"], "schedule.precision = 'fp16' is not allowed; choose one of auto, bf16, fp32"),
    (["checkpoint.keep=0"], "checkpoint.keep must be >= 1, got 0"),
    (["logging.log_every=0"], "logging.log_every must be >= 1, got 0"),
    (["data.path=123"], "data.path must be a string, got 123"),
    (["model.dim=[1"], "override 'model.dim=[1': the value is not valid YAML (line 1, column 3"),
])
def test_every_size_and_value_is_checked_when_loaded(overrides, message):
    # load_config alone raises: `longscan config` and `longscan train` report it before any process starts
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_values_are_not_rewritten():
    cfg = validate(load_config(None, ["model.vocab_size=300", "model.pad_vocab_to=7", "optimizer.lr=2e-4"]), 4)
    assert (cfg.model.vocab_size, cfg.model.pad_vocab_to, cfg.optimizer.lr) == (300, 7, 2e-4)
    assert cfg.model.padded_vocab == 301


def test_a_section_changed_after_loading_is_checked_again():
    cfg = load_config()
    cfg.schedule.steps = 0
    with pytest.raises(ConfigError, match="schedule.steps must be >= 1, got 0"):
        validate(cfg, 4)


def test_vocabulary_too_small_for_the_data(tmp_path):
    with pytest.raises(ConfigError, match=r"model.vocab_size = 100 is smaller than the data's vocabulary \(257\); "
                                          r"set model.vocab_size=257"):
        validate(load_config(None, ["model.vocab_size=100"]), 4)
    path = tmp_path / "tok.bin"
    path.write_bytes(b"")
    (tmp_path / "tok.bin.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 1000, "eos": 999,
                                                       "num_tokens": 0}))
    tokens = ["data.source=tokens", f"data.path={path}"]
    with pytest.raises(ConfigError, match=r"model.vocab_size = 257 is smaller than the data's vocabulary \(1000\)"):
        validate(load_config(None, tokens), 4)
    assert validate(load_config(None, tokens + ["model.vocab_size=1000"]), 4).model.vocab_size == 1000


@pytest.mark.parametrize("variant", ["deltanet", "gated_deltanet", "kda"])
def test_delta_rule_variants_refuse_a_backend_without_delta_kernels(variant):
    """fla has no delta-rule backend here: refused before any process starts, naming both keys."""
    with pytest.raises(ConfigError, match=rf"model.linear_variant = '{variant}' runs the delta-rule kernels, whose "
                                          r"backends are auto, naive, torch, triton; parallel.linear_backend = "
                                          r"'fla' is not one of them"):
        validate(load_config(None, [f"model.linear_variant={variant}", "parallel.linear_backend=fla"]), 4)
    assert validate(load_config(None, [f"model.linear_variant={variant}", "parallel.linear_backend=triton"]), 4)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dim: 64\n  n_heads: [4\nparallel:\n  sp: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value).startswith(f"{path}: malformed YAML at line ")
    assert re.search(r"line [45], column \d+", str(e.value))


def test_overrides_in_any_position_of_the_command_line(tmp_path, capsys):
    from longscan.cli import main
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 64\n")
    assert main(["config", "parallel.sp=4", "--config", str(path), "model.n_layers=8"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert (out["parallel"]["sp"], out["model"]["n_layers"], out["model"]["dim"]) == (4, 8, 64)
    assert main(["config", "model.n_layers=0"]) == 2
    assert "model.n_layers must be >= 1, got 0" in capsys.readouterr().err


def test_sp_spec_from_the_parallel_config():
    from longscan.models import SPSpec
    p = load_config(None, ["parallel.layout=contiguous", "parallel.linear_method=lasp2",
                           "parallel.softmax_method=allgather", "parallel.linear_overlap=true"]).parallel
    group = object()
    spec = SPSpec.from_config(p, group)
    assert spec == SPSpec(group=group, layout="contiguous", linear_method="lasp2", softmax_method="allgather",
                          linear_backend="auto", softmax_backend="auto", linear_overlap=True)


@pytest.mark.parametrize("overrides, message", [
    (["kernels.keep_gate_operands=no_thanks"], "kernels.keep_gate_operands must be true or false, got 'no_thanks'"),
    (["kernels.gate_grad_f32_state=1"], "kernels.gate_grad_f32_state must be true or false, got 1"),
    (["kernels.chunk=8"], "kernels.chunk must be >= 16, got 8"),
    (["kernels.chunk_per_key=48"], "kernels.chunk_per_key must be a power of two >= 16, got 48"),
    (["kernels.segments=-1"], "kernels.segments must be >= 0, got -1"),
    (["kernels.num_sms=-4"], "kernels.num_sms must be >= 0, got -4"),
    (["kernels.split_below=0"], "kernels.split_below must be >= 1, got 0"),
    (["kernels.programs_per_sm=0"], "kernels.programs_per_sm must be >= 1, got 0"),
    (["kernels.min_segment_chunks=0"], "kernels.min_segment_chunks must be >= 1, got 0"),
    (["kernels.block=32"], "unknown config key 'kernels.block'; allowed: chunk, chunk_per_key, delta_path, gate_grad_f32_state"),
])
def test_kernel_options_refuse_bad_values_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_kernel_options_changed_after_loading_are_checked_again():
    cfg = load_config()
    cfg.kernels.chunk = 96
    with pytest.raises(ConfigError, match="kernels.chunk must be a power of two >= 16, got 96"):
        validate(cfg, 4)


def test_kernel_options_from_the_config():
    from longscan.kernels.linear_attention import LinearKernelOptions
    assert load_config().kernels.options() == LinearKernelOptions()
    k = load_config(None, ["kernels.keep_gate_operands=false", "kernels.segments=3", "kernels.num_sms=132",
                           "kernels.chunk=32", "kernels.chunk_per_key=16", "kernels.split_below=5",
                           "kernels.programs_per_sm=6", "kernels.min_segment_chunks=2",
                           "kernels.gate_grad_f32_state=false"]).kernels
    assert k.options() == LinearKernelOptions(keep_gate_operands=False, segments=3, num_sms=132, chunk=32,
                                              chunk_per_key=16, split_below=5, programs_per_sm=6,
                                              min_segment_chunks=2, gate_grad_f32_state=False)


def test_sp_spec_carries_the_kernel_options():
    from longscan.models import SPSpec
    cfg = load_config(None, ["kernels.keep_gate_operands=false"])
    options = cfg.kernels.options()
    assert SPSpec.from_config(cfg.parallel, None, options).linear_options is options
    assert SPSpec.from_config(cfg.parallel, None).linear_options is None
    with pytest.raises(TypeError, match="SPSpec.linear_options must be a LinearKernelOptions or None, got dict"):
        SPSpec(linear_options={"keep_gate_operands": False})
