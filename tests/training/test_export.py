"""Export: train 2 steps with TP = 2 on CPU, export the checkpoint to one safetensors file, load it in this
(unlaunched) process and compare its logits and per-token loss with the distributed model's."""
from __future__ import annotations

import os

import pytest
import torch

from harness import rel_err, run_distributed
from training_common import tiny

pytest.importorskip("safetensors")

CFG = tiny(parallel={"tp": 2}, schedule={"steps": 2, "warmup_steps": 0})
CFG_PP = tiny(parallel={"tp": 2, "pp": 2}, schedule={"steps": 2, "warmup_steps": 0})
B, T = 2, 32


def _inputs():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 257, (B, T), generator=g)
    labels = torch.randint(0, 257, (B, T), generator=g)
    return tokens, labels


def _train_then_forward(rank, world, ckpt_dir):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from longscan.training.config import load_config
    from longscan.training.export import logits
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, dict(CFG, checkpoint={"dir": ckpt_dir})))
    t.train()
    t.model.eval()
    tokens, labels = _inputs()
    with torch.no_grad():
        local = logits(t.model, tokens)  # this TP rank's vocabulary columns
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
        loss = t.model(tokens, labels)
    return {"logits": torch.cat(parts, dim=-1).numpy(), "loss": loss.numpy(), "step": t.step}


def _train_pp_then_validate(rank, world, ckpt_dir):
    """TP 2 x PP 2: the validation loss (the model's own forward over the pipeline) and its sequences."""
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, dict(CFG_PP, checkpoint={"dir": ckpt_dir})))
    t.train()
    c, r = t.cfg, t.ranks
    seqs = [(mb.tokens.numpy(), mb.labels.numpy()) for b in range(c.schedule.val_batches)
            for mb in t.data.val_microbatches(b, c.data.global_batch_size, c.data.micro_batch_size, r.dp_rank, r.dp)]
    return {"val_loss": t.evaluate(), "seqs": seqs, "log_rank": r.is_log_rank}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt_dir = str(root / "ckpt")
    return run_distributed(_train_then_forward, 2, ckpt_dir), ckpt_dir, root


@pytest.fixture
def one_process():
    """load_exported starts a one-process group in this pytest process; later tests must not see it."""
    yield
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_exported_model_matches_the_tp2_model(trained, one_process):
    from longscan.training.config import load_config
    from longscan.training.export import ExportOptions, export, load_exported, logits
    results, ckpt_dir, root = trained
    step_dir = os.path.join(ckpt_dir, "step_00000002")
    out = str(root / "model.safetensors")
    info = export(ExportOptions(checkpoint=step_dir, output=out), load_config(None, CFG).model)
    assert info["step"] == 2 == results[0]["step"]
    assert not [n for n in os.listdir(root) if n.startswith(".export-")]  # no temporary left behind
    model = load_exported(out)
    tokens, labels = _inputs()
    with torch.no_grad():
        got = logits(model, tokens)
        ce = torch.nn.functional.cross_entropy(got.flatten(0, 1), labels.flatten(), reduction="none").view(B, T)
    want = torch.from_numpy(results[0]["logits"])
    assert got.shape == want.shape == (B, T, model.cfg.padded_vocab)
    assert torch.equal(want, torch.from_numpy(results[1]["logits"]))
    assert rel_err(got, want) < 1e-5
    assert rel_err(ce, torch.from_numpy(results[0]["loss"])) < 1e-5
    # trained weights, not the initial ones: a fresh model of the same config gives other logits
    from longscan.training.export import unsplit_model
    with torch.no_grad():
        fresh = logits(unsplit_model(model.cfg), tokens)
    assert rel_err(fresh, want) > 1e-3


def test_pipeline_stages_and_tp_shards_gathered(tmp_path, one_process):
    from longscan.training.config import load_config
    from longscan.training.export import ExportOptions, export, load_exported, logits
    results = run_distributed(_train_pp_then_validate, 4, str(tmp_path / "ckpt"))
    want = [r["val_loss"] for r in results if r["log_rank"]][0]
    out = str(tmp_path / "model.safetensors")
    export(ExportOptions(checkpoint=str(tmp_path / "ckpt"), output=out), load_config(None, CFG_PP).model)
    model = load_exported(out)
    total, n = 0.0, 0
    with torch.no_grad():
        for tokens, labels in results[0]["seqs"]:
            lg = logits(model, torch.from_numpy(tokens))
            total += torch.nn.functional.cross_entropy(lg.flatten(0, 1).double(), torch.from_numpy(labels).flatten(),
                                                       reduction="sum").item()
            n += labels.size
    assert abs(total / n - want) < 1e-5 * want


def test_newest_checkpoint_is_found_from_the_directory(trained):
    from longscan.training.export import resolve_checkpoint
    _, ckpt_dir, _ = trained
    assert resolve_checkpoint(ckpt_dir).endswith("step_00000002")


def test_mismatched_config_and_bad_paths_are_named(trained, tmp_path):
    from longscan.training.config import load_config
    from longscan.training.export import ExportError, ExportOptions, export, load_exported
    _, ckpt_dir, _ = trained
    wider = load_config(None, tiny(model={"dim": 128})).model
    with pytest.raises(ExportError, match="parameter .* has shape"):
        export(ExportOptions(checkpoint=ckpt_dir, output=str(tmp_path / "m.safetensors")), wider)
    with pytest.raises(ExportError, match="neither a complete checkpoint"):
        export(ExportOptions(checkpoint=str(tmp_path), output=str(tmp_path / "m.safetensors")),
               load_config(None, CFG).model)
    with pytest.raises(ExportError, match="is a directory"):
        export(ExportOptions(checkpoint=ckpt_dir, output=str(tmp_path)), load_config(None, CFG).model)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ExportError, match="does not exist"):
        load_exported(str(tmp_path / "none.safetensors"))


def test_command_line(trained, tmp_path, capsys):
    from longscan.training.export import cmd_export
    _, ckpt_dir, _ = trained
    out = str(tmp_path / "m.safetensors")
    assert cmd_export(["--checkpoint", ckpt_dir, "--output", out]) == 2  # the embedded config: dim 128, not 64
    assert "longscan export: checkpoint" in capsys.readouterr().err and not os.path.exists(out)
    assert cmd_export(["--checkpoint", ckpt_dir, "--output", out, "model.dim=64"]) == 0
    assert "(step 2)" in capsys.readouterr().out and os.path.isfile(out)
