"""kernels.delta_path picks the delta rule's Triton kernels in the model: a training step of a tiny KDA and Gated
DeltaNet model on the Triton backend (interpreter, float32) on path "wy" gives the loss and gradients of path
"float32", and the scans it runs are the ones asked for; a bad value is refused naming the key."""
from __future__ import annotations

import os

import pytest
import torch

from harness import rel_err, run_distributed

pytest.importorskip("triton")
if torch.cuda.is_available():   # the trainer would run bf16 on the GPU: this compares float32 paths on CPU
    pytest.skip("the interpreter's float32 comparison runs without CUDA", allow_module_level=True)


def _step(rank, world, variant, path):
    from training_common import local_tensors, tiny
    from longscan.kernels import trace
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    cfg = tiny(model={"linear_variant": variant, "pattern": "L", "n_layers": 1, "dim": 32, "n_heads": 2},
               parallel={"linear_backend": "triton"}, kernels={"delta_path": path})
    t = Trainer(load_config(None, cfg))
    with trace.record() as events:
        m = t.train_step()
    scans = sorted({(e.info["path"], e.info["outputs"]) for e in events if e.name == "delta_scan"})
    grads = {n: g for n, (_, g, _) in local_tensors(t)["tensors"].items()}
    return {"loss": m["loss"], "scans": scans, "grads": grads}


def _both(rank, world):
    return {(v, p): _step(rank, world, v, p) for v in ("gated_deltanet", "kda") for p in ("float32", "wy")}


@pytest.fixture(scope="module")
def results():
    # the worker inherits the interpreter from its start: Triton reads the variable as it decorates its own
    # functions (at `import triton`), before this test's code runs there
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return run_distributed(_both, 1)[0]
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.mark.parametrize("variant", ["gated_deltanet", "kda"])
def test_wy_path_matches_float32_path_in_a_training_step(results, variant):
    ref, got = results[(variant, "float32")], results[(variant, "wy")]
    assert ref["scans"] == [("float32", True)] and got["scans"] == [("wy", True)]
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    assert ref["grads"].keys() == got["grads"].keys() and ref["grads"]
    for n, want in ref["grads"].items():
        assert rel_err(torch.from_numpy(got["grads"][n]), torch.from_numpy(want)) <= 1e-4, n


def test_bad_delta_path_is_refused():
    from training_common import tiny
    from longscan.training.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="kernels.delta_path"):
        load_config(None, tiny(kernels={"delta_path": "tf32"}))
