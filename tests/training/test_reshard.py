"""Resume across TP and PP changes, in one spawn of 2 gloo processes: 2 steps at one layout, saved,
2 more at another, against 4 steps at the new layout from the start (same initial full state: the init
does not depend on TP or PP) -- losses, parameters and AdamW moments, to float32 round-off."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from harness import run_distributed
from training_common import assemble, local_tensors, tiny

LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}
CASES = [("tp2", "tp1"), ("pp2", "tp1"), ("tp1", "tp2"), ("tp1", "pp2")]
"""(saved layout, resumed layout); tp1 is also pp1."""


def _cfg(layout: str, **sections) -> dict:
    base = tiny(schedule={"steps": 4, "warmup_steps": 1})
    return dict(base, parallel=dict(base["parallel"], **LAYOUTS[layout]), **sections)


def _moments(trainer) -> dict:
    """local_tensors' format with (exp_avg, exp_avg_sq) in place of (param, grad)."""
    out = local_tensors(trainer)
    for name, p in trainer.model.named_parameters():
        st = trainer.optimizer.state[p]
        out["tensors"][name] = (st["exp_avg"].cpu().numpy().copy(), st["exp_avg_sq"].cpu().numpy().copy(),
                                out["tensors"][name][2])
    out["step"] = {float(trainer.optimizer.state[p]["step"]) for p in trainer.model.parameters()}
    return out


def _run(cfg) -> dict:
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    t = Trainer(load_config(None, cfg))
    try:
        start = t.step
        hist = t.train()
        return {"start": start, "losses": [loss for _, loss in hist["train"]], "params": local_tensors(t),
                "moments": _moments(t)}
    finally:
        t.close()


def _all(rank, world, root):
    import torch.distributed as dist
    out = {}
    for layout in LAYOUTS:  # uninterrupted references; also 2 steps of each, saved
        out[f"ref_{layout}"] = _run(_cfg(layout))
        out[f"stop_{layout}"] = _run(_cfg(layout, checkpoint={"dir": os.path.join(root, layout), "every": 2},
                                          logging={"stop_after": 2, "log_every": 1000}))
    for saved, new in CASES:
        d = os.path.join(root, f"{saved}_to_{new}")
        if rank == 0:
            shutil.copytree(os.path.join(root, saved), d, ignore=shutil.ignore_patterns("LOCK"))
        dist.barrier()
        out[f"{saved}_to_{new}"] = _run(_cfg(new, checkpoint={"dir": d, "every": 0}))
    # a model change is still refused, also together with a TP change
    try:
        _run(_cfg("tp2", model=dict(tiny()["model"], dim=32), checkpoint={"dir": os.path.join(root, "tp1")}))
        out["model_change"] = None
    except Exception as e:
        out["model_change"] = (type(e).__name__, str(e))
    # without resharding (the ZeRO engine's optimizer state), a TP change is refused, naming it
    from longscan.training import checkpoint as ckpt
    saved = ckpt.read_marker(ckpt.latest(os.path.join(root, "tp1")))["layout"]
    try:
        ckpt.select(os.path.join(root, "tp1"), dict(saved, tp=2, dp=1), reshard=False)
        out["no_reshard"] = None
    except Exception as e:
        out["no_reshard"] = (type(e).__name__, str(e))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(_all, 2, str(tmp_path_factory.mktemp("reshard")))


def _full(results, run, what):
    return assemble([r[run][what] for r in results])


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float32 round-off of differently split reductions, relative to the tensor's scale."""
    return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-12


@pytest.mark.parametrize("saved,new", CASES)
def test_resume_across_layout_matches_the_new_layout_from_the_start(results, saved, new):
    run, ref = f"{saved}_to_{new}", f"ref_{new}"
    assert [r[run]["start"] for r in results] == [2, 2]
    losses = next(r[run]["losses"] for r in results if r[run]["losses"])  # the last stage logs the loss
    ref_losses = next(r[ref]["losses"] for r in results if r[ref]["losses"])
    assert len(losses) == 2 and len(ref_losses) == 4
    for a, b in zip(losses, ref_losses[2:]):
        assert math.isclose(a, b, rel_tol=1e-5), (losses, ref_losses)
    for what in ("params", "moments"):  # (parameter, last gradient) and (exp_avg, exp_avg_sq)
        got_a, got_b = _full(results, run, what)
        ref_a, ref_b = _full(results, ref, what)
        assert got_a.keys() == ref_a.keys() and len(got_a) > 0
        for name in got_a:
            for got, want in ((got_a[name], ref_a[name]), (got_b[name], ref_b[name])):
                assert got.shape == want.shape and _close(got, want), (what, name, float((got - want).abs().max()))
    assert {s for r in results for s in r[run]["moments"]["step"]} == {4.0}


@pytest.mark.parametrize("saved,new", CASES)
def test_resumed_run_differs_from_a_fresh_start(results, saved, new):
    """Nothing loaded would make the resumed run a fresh 2-step run at the new layout: it is not."""
    run = f"{saved}_to_{new}"
    fresh = next(r[f"ref_{new}"]["losses"] for r in results if r[f"ref_{new}"]["losses"])[:2]
    losses = next(r[run]["losses"] for r in results if r[run]["losses"])
    assert all(abs(a - b) > 1e-3 * abs(b) for a, b in zip(losses, fresh)), (losses, fresh)
    got, _ = _full(results, run, "params")
    after_two, _ = _full(results, f"stop_{new}", "params")
    assert got.keys() == after_two.keys()
    assert not any(_close(got[n], after_two[n]) for n in got), "a parameter did not move in the resumed steps"


def test_model_change_is_still_refused(results):
    for r in results:
        name, msg = r["model_change"]
        assert name == "CheckpointMismatch" and "model.dim: checkpoint 64, this run 32" in msg, msg
        assert "cannot resume from" in msg and "the model config may not" in msg, msg


def test_pieces_cover_the_new_shard_from_the_saved_ones():
    from longscan.training.checkpoint import CheckpointMismatch
    from longscan.training.reshard import Piece, pieces
    assert pieces(8, 1, 2, 1) == [Piece(0, slice(4, 8), slice(0, 4))]
    assert pieces(8, 4, 2, 1) == [Piece(2, slice(0, 2), slice(0, 2)), Piece(3, slice(0, 2), slice(2, 4))]
    assert pieces(12, 3, 2, 0) == [Piece(0, slice(0, 4), slice(0, 4)), Piece(1, slice(0, 2), slice(4, 6))]
    full = torch.randn(12, 3)
    for saved_tp, tp in [(3, 2), (2, 3), (1, 4), (4, 1), (2, 2)]:
        shards = full.chunk(saved_tp, dim=0)
        for rank in range(tp):
            mine = torch.empty(12 // tp, 3)
            for pc in pieces(12, saved_tp, tp, rank):
                mine[pc.dst] = shards[pc.saved_rank][pc.src]
            assert torch.equal(mine, full.chunk(tp, dim=0)[rank]), (saved_tp, tp, rank)
    with pytest.raises(CheckpointMismatch, match="does not divide"):
        pieces(10, 4, 2, 0)


def test_tp_change_without_resharding_is_refused(results):
    for r in results:
        name, msg = r["no_reshard"]
        assert name == "CheckpointMismatch" and "parallel.tp: checkpoint 1, this run 2" in msg, msg
