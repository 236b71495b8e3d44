"""`longscan profile` end to end on 2 gloo processes (SP 2): what each layer's collectives moved equals the
method's formula × microbatches × steps, the trace holds one process lane per rank, and profiling leaves
nothing installed behind it."""
from __future__ import annotations

import json
import os

import pytest

from harness import run_distributed

TINY = {"model": {"dim": 64, "n_layers": 4, "pattern": "LLLN", "n_heads": 4, "n_kv_heads": 2,
                  "linear_variant": "lightning"},
        "data": {"seq_len": 64, "global_batch_size": 2, "micro_batch_size": 1},
        "schedule": {"steps": 10, "warmup_steps": 0, "val_every": 0, "val_batches": 1}}


def tiny(**sections) -> dict:
    out = {k: dict(v) for k, v in TINY.items()}
    for sec, vals in sections.items():
        out.setdefault(sec, {}).update(vals)
    return out

try:
    import deepspeed.sequence.layer  # noqa: F401
    ULYSSES = "ulysses"
except Exception:   # ulysses is an optional extra; without it the third case runs ring
    ULYSSES = "ring"
CASES = [("zeco", "ring", "contiguous"), ("lasp2", "allgather", "zigzag"), ("lasp1", ULYSSES, "zigzag")]
PARALLEL = {"sp": 2, "linear_backend": "torch"}
STEPS = 1


def _profile(rank, world, root):
    import torch.distributed as dist
    from longscan.distributed import stats
    from longscan.observe.profile import ProfileOptions, run_profile
    from longscan.training.config import load_config
    out = {}
    originals = (dist.isend, dist.irecv, dist.all_reduce, dist.P2POp)
    for lin, soft, layout in CASES:
        cfg = load_config(None, tiny(parallel=PARALLEL | {"layout": layout, "linear_method": lin,
                                                          "softmax_method": soft}))
        d = os.path.join(root, f"{lin}_{soft}")
        summary = run_profile(cfg, ProfileOptions(steps=STEPS, warmup=0, out=d))
        out[(lin, soft, layout)] = summary
    out["restored"] = (dist.isend, dist.irecv, dist.all_reduce, dist.P2POp) == originals
    out["recorder_off"] = stats._RECORDER is None
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("profile"))
    return run_distributed(_profile, 2, root), root


@pytest.mark.parametrize("lin,soft,layout", CASES)
def test_layer_bytes_equal_plan_prediction(results, lin, soft, layout):
    """Per rank and layer: the bytes sent/received and calls measured = `longscan plan`'s prediction."""
    from longscan.observe.plan import layer_traffic
    from longscan.training.config import load_config, validate
    res, _ = results
    s = res[0][(lin, soft, layout)]
    assert s["parallel"]["linear_method"] == lin and s["parallel"]["softmax_method"] == soft
    cfg = validate(load_config(None, tiny(parallel=PARALLEL | {"layout": layout, "linear_method": lin,
                                                               "softmax_method": soft},
                                          schedule={"precision": "fp32"})), 2)
    for rep in s["ranks"]:
        measured: dict = {}
        for c in rep["comm"]:
            if c["layer"].endswith(".attn"):
                e = measured.setdefault(c["layer"], [0, 0, 0])
                e[0] += c["bytes_sent"]
                e[1] += c["bytes_received"]
                e[2] += c["calls"]
        predicted = {k: [t.sent * STEPS, t.recv * STEPS, t.calls * STEPS]
                     for k, t in layer_traffic(cfg, rep["rank"]).items()}
        assert len(predicted) == 4 and all(v[0] > 0 for v in predicted.values())
        assert measured == predicted, rep["rank"]


def test_summary_and_trace(results):
    res, root = results
    s = res[0][CASES[0]]
    assert res[1][CASES[0]] is None       # rank 1 reports to rank 0
    d = os.path.join(root, "zeco_ring")
    with open(os.path.join(d, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk["comm"] == s["comm"]
    for e in s["comm"]:
        assert set(e) == {"kind", "layer", "calls", "bytes_sent", "bytes_received", "time_s", "exposed_s"}
        assert e["exposed_s"] <= e["time_s"] + 1e-12
    kinds = {e["kind"] for e in s["comm"]}
    assert {"all_scan", "ring_p2p", "dp_sp_all_reduce"} <= kinds      # SP layers and the gradient reduction
    layers = {c["layer"] for c in s["ranks"][0]["compute"]}
    assert {"embedding", "head+loss", "optimizer", "layers.0.attn", "layers.3.mlp"} <= layers
    assert set(s["compute_by_kind_s"]) == {"linear attention", "softmax attention", "MLP", "embedding + loss",
                                           "optimizer"}
    assert all(v > 0 for v in s["compute_by_kind_s"].values())
    assert 0 < s["exposed_comm_fraction"] < 1 and s["tokens_per_s"] > 0 and s["peak_mem_mb"] > 0
    assert s["mfu"] is None                                               # CPU: no peak to hold it against
    with open(os.path.join(d, "trace.json")) as f:
        trace = json.load(f)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "process_name"}
    assert names == {"rank 0", "rank 1"}
    ev = [e.get("name", "") for e in trace["traceEvents"] if e.get("pid") == 1]
    assert any(n == "comm:all_scan" for n in ev) and any(n == "backward:layers.0.attn" for n in ev)


def test_png_when_matplotlib(results):
    pytest.importorskip("matplotlib")
    _, root = results
    assert os.path.getsize(os.path.join(root, "zeco_ring", "profile.png")) > 0


def test_nothing_left_installed(results):
    res, _ = results
    for r in res:
        assert r["restored"] and r["recorder_off"]


def test_ulysses_all_to_all_timed(results):
    if ULYSSES != "ulysses":
        pytest.skip("ulysses needs deepspeed")
    res, _ = results
    s = res[0][CASES[2]]
    e = [c for c in s["comm"] if c["kind"] == "ulysses_all_to_all"]
    assert e and all(c["time_s"] > 0 and c["bytes_sent"] > 0 for c in e)
