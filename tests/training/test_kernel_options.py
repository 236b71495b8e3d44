"""The kernels config section reaches every linear-attention layer's kernels, and changes no result.

One spawn of 2 gloo processes (SP 2) runs one training step of a one-layer per-key-gate (gla) model per
setting: on the torch backend (which takes no kernel options) with the default and non-default kernels
sections, and on the Triton backend (CPU interpreter, float32) with kernels.keep_gate_operands true and false,
whose kernels' trace events show which setting they ran with.
"""
from __future__ import annotations

import pytest
import torch

from harness import rel_err, run_distributed
from training_common import local_tensors, tiny

pytestmark = pytest.mark.interpreted   # its workers run the Triton kernels in the CPU interpreter

TOL = 1e-5
# one per-key-gate layer, 32 tokens a rank: two chunks of 16 and two segments on each rank
MODEL = {"linear_variant": "gla", "pattern": "L", "n_layers": 1, "dim": 32, "n_heads": 2}
PARALLEL = {"sp": 2, "linear_method": "lasp2", "layout": "contiguous"}
DATA = {"seq_len": 64, "global_batch_size": 1, "micro_batch_size": 1}
KERNELS = {"chunk": 16, "chunk_per_key": 16, "segments": 2, "split_below": 3, "programs_per_sm": 5,
           "min_segment_chunks": 1, "num_sms": 7}


def _config(backend: str, kernels: dict):
    from longscan.training.config import load_config
    return load_config(None, tiny(model=MODEL, parallel={**PARALLEL, "linear_backend": backend}, data=DATA,
                                  kernels=kernels))


def _step(cfg) -> dict:
    from longscan.kernels import trace
    from longscan.models.linear_attn import LinearAttention
    from longscan.training.trainer import Trainer
    t = Trainer(cfg)
    layers = [m for m in t.model.modules() if isinstance(m, LinearAttention)]
    assert layers and all(m.sp.linear_options == cfg.kernels.options() for m in layers)
    with trace.record() as events:
        m = t.train_step()
    return {"loss": m["loss"], "events": [(e.name, dict(e.info)) for e in events
                                          if e.name in ("forward", "backward", "gate_operands")],
            **local_tensors(t)}


def _worker(rank, world):
    import importlib
    import os
    os.environ["TRITON_INTERPRET"] = "1"   # read when the kernel module is first imported (here)
    importlib.import_module("longscan.kernels.linear_attention.triton")
    out = {"torch_default": _step(_config("torch", {})),
           "torch_options": _step(_config("torch", {**KERNELS, "keep_gate_operands": False})),
           "triton_keep": _step(_config("triton", {**KERNELS, "keep_gate_operands": True})),
           "triton_no_keep": _step(_config("triton", {**KERNELS, "keep_gate_operands": False}))}
    for r in out.values():
        r["events"] = [(n, {k: v for k, v in i.items() if isinstance(v, bool)}) for n, i in r["events"]]
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2)


def _after_backward(events) -> list[dict]:
    """The gate pre-passes that the kernels' backward ran (those after its first event)."""
    names = [n for n, _ in events]
    start = names.index("backward")
    return [info for n, info in events[start:] if n == "gate_operands"]


def test_torch_step_with_non_default_options_equals_the_default_step(results):
    for res in results:
        a, b = res["torch_default"], res["torch_options"]
        assert a["loss"] == b["loss"]
        assert a["tensors"].keys() == b["tensors"].keys()
        for name, (p, g, _) in a["tensors"].items():
            assert (p == b["tensors"][name][0]).all() and (g == b["tensors"][name][1]).all(), name


def test_triton_step_with_the_options_matches_the_torch_step(results):
    for res in results:
        ref = res["torch_default"]
        for run in ("triton_keep", "triton_no_keep"):
            assert abs(res[run]["loss"] - ref["loss"]) <= TOL * abs(ref["loss"])
            for name, (p, g, _) in ref["tensors"].items():
                p2, g2 = res[run]["tensors"][name][:2]
                assert rel_err(torch.from_numpy(g2), torch.from_numpy(g)) <= TOL, (run, name)
                assert rel_err(torch.from_numpy(p2), torch.from_numpy(p)) <= TOL, (run, name)


def test_keep_gate_operands_reaches_every_layers_kernels(results):
    """kernels.keep_gate_operands=true: the forward keeps its gate operands and the backward runs no pre-pass;
    false: the forward keeps none and the backward runs its own pre-pass, writing its factors."""
    for res in results:
        kept, dropped = res["triton_keep"]["events"], res["triton_no_keep"]["events"]
        assert ("forward", {"return_saved": True}) in kept and "backward" in [n for n, _ in kept]
        assert _after_backward(kept) == []
        assert [e["factors"] for e in _after_backward(dropped)] == [True]
