"""kernels.delta_path picks the delta rule's Triton kernels in the model: a training step of a tiny KDA and Gated
DeltaNet model on the Triton backend (interpreter, float32) on path "wy" gives the loss and gradients of path
"float32", and the scans it runs are the ones asked for; the default, "auto", runs path "float32" on these
float32 activations, and reaches path "wy" with bf16 q, k, v under bf16 autocast; a bad value is refused naming
the key."""
from __future__ import annotations

import pytest
import torch

from harness import rel_err, run_distributed_interpreted

pytestmark = pytest.mark.interpreted   # its workers run the Triton kernels in the CPU interpreter

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


class _Reached(Exception):
    """Raised where the kernels would start (the interpreter runs float32 only)."""


def _bf16_step(rank, world):
    """A Gated DeltaNet step under bf16 autocast with normalize in float32, as CUDA autocast runs it: what the
    default path reaches (the dtypes of q, k, v there), stopped at the kernels' entry."""
    import torch.nn.functional as F
    from training_common import tiny
    from longscan.kernels import trace
    from longscan.kernels.delta_rule.triton import chunk
    from longscan.training.config import load_config
    from longscan.training.trainer import Trainer
    cfg = tiny(model={"linear_variant": "gated_deltanet", "pattern": "L", "n_layers": 1, "dim": 32, "n_heads": 2},
               parallel={"linear_backend": "triton"}, schedule={"precision": "bf16"})
    t = Trainer(load_config(None, cfg))
    normalize, reached = F.normalize, []
    F.normalize = lambda x, *a, **kw: normalize(x.float(), *a, **kw)   # this process ends after the step

    def stop(q, k, v, *_, **__):
        reached.append(tuple(str(x.dtype) for x in (q, k, v)))
        raise _Reached
    chunk.wy_scan = lambda **a: stop(a["q"], a["k"], a["v"])
    chunk.DeltaRuleChunk.apply = stop   # the float32 kernels' entry, stopped alike
    with trace.record() as events:
        try:
            t.train_step()
        except _Reached:
            pass
    return {"scans": [(e.info["path"], e.info["outputs"]) for e in events if e.name == "delta_scan"],
            "reached": reached}


def _both(rank, world):
    out = {(v, p): _step(rank, world, v, p) for v in ("gated_deltanet", "kda") for p in ("float32", "wy", "auto")}
    out["bf16"] = _bf16_step(rank, world)   # last: it patches F.normalize and the wy entry in this process
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed_interpreted(_both, 1)[0]


@pytest.mark.parametrize("variant", ["gated_deltanet", "kda"])
def test_wy_path_matches_float32_path_in_a_training_step(results, variant):
    ref, got = results[(variant, "float32")], results[(variant, "wy")]
    assert ref["scans"] == [("float32", True)] and got["scans"] == [("wy", True)]
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    assert ref["grads"].keys() == got["grads"].keys() and ref["grads"]
    for n, want in ref["grads"].items():
        assert rel_err(torch.from_numpy(got["grads"][n]), torch.from_numpy(want)) <= 1e-4, n


@pytest.mark.parametrize("variant", ["gated_deltanet", "kda"])
def test_auto_path_runs_float32_kernels_on_float32_activations(results, variant):
    ref, got = results[(variant, "float32")], results[(variant, "auto")]
    assert got["scans"] == [("float32", True)]
    assert got["loss"] == ref["loss"] and ref["grads"].keys() == got["grads"].keys()
    for n, want in ref["grads"].items():
        assert (got["grads"][n] == want).all(), n


def test_auto_path_reaches_the_wy_kernels_under_bf16_autocast(results):
    """q and k reach the kernels in bf16 (v's dtype) though normalize ran in float32, so the default path
    runs the tensor-core kernels."""
    assert results["bf16"]["scans"] == [("wy", True)]
    assert results["bf16"]["reached"] == [("torch.bfloat16",) * 3]


def test_auto_is_the_default():
    from training_common import tiny
    from longscan.training.config import load_config
    assert load_config(None, tiny()).kernels.delta_path == "auto"


def test_bad_delta_path_is_refused():
    from training_common import tiny
    from longscan.training.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="kernels.delta_path"):
        load_config(None, tiny(kernels={"delta_path": "tf32"}))
