"""`longscan plan`: clear errors for bad input, and the cost model's terms on a hand-checked table."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from longscan.observe import plan as P
from longscan.training.config import load_config, validate

MODEL = ["model.dim=256", "model.n_heads=4", "model.n_kv_heads=4", "model.n_layers=4", "model.pattern=LLLN",
         "data.global_batch_size=4", "data.seq_len=4096"]
TABLE = {"gpu": "test", "memory_bytes": 8 * 2**30, "matmul_flops_per_s": 1e14,
         "linear_s_per_token_head": {"lightning": {"64": 2e-9}}, "softmax_s_per_pair_head": {"64": 3e-12}}


@pytest.fixture()
def table(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(TABLE))
    return str(path)


def test_shipped_tables_load():
    for gpu in P.GPUS:
        costs = P.costs_for(gpu)
        assert costs.gpu == gpu and costs.matmul_flops_per_s > 1e14 and costs.memory_bytes > 70 * 2**30
        assert costs.linear("lightning", 128) > 0 and costs.softmax(128) > 0


def test_no_shipped_table_is_said_clearly(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "COSTS_DIR", str(tmp_path))
    assert P.cmd_plan(["--gpus", "2", "--gpu", "h200"]) == 2
    assert "no measured kernel-cost table for --gpu h200" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--gpu", "a100"], "--gpu 'a100' is not known"),
    (["--interconnect", "carrier-pigeon"], "--interconnect 'carrier-pigeon' is not known"),
    (["--linear-methods", "zeco,lasp3"], "unknown method 'lasp3'"),
    (["--softmax-methods", "flash"], "unknown method 'flash'"),
    (["parallel.sp=2", "data.seq_len=4098"], "data.seq_len = 4098 must divide into 4 pieces"),
    (["--costs", "/nonexistent.json"], "--costs file not found"),
    (["--host-gib", "0"], "--host-gib must be > 0"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
])
def test_bad_input(capsys, table, args, message):
    costs = [] if "--costs" in args or "--gpu" in args else ["--costs", table]
    assert P.cmd_plan(["--gpus", "2"] + costs + args + MODEL[:5]) == 2
    assert message in capsys.readouterr().err


def test_one_gpu_is_compute_only(table):
    cfg = load_config(None, MODEL + ["parallel.sp=1"])
    costs = P.costs_for("h100", table)
    preds = P.plan(cfg, 1, costs, P.INTERCONNECTS["nvlink4"], ("zeco",), ("ring",))
    r = preds[0]
    assert r.exposed_comm_s == 0 and r.comm_bytes_per_gpu == 0
    # 4 sequences × 4096 tokens; 3 linear layers, 1 softmax layer, 4 heads of 64
    from longscan.observe.flops import matmul_flops_per_token
    c = validate(cfg, 1)
    tokens = 4 * 4096
    want = (tokens * matmul_flops_per_token(c.model) / 1e14 + 3 * tokens * 4 * 2e-9
            + 4 * 4096 * 4097 / 2 * 4 * 3e-12)
    assert r.compute_s == pytest.approx(want) and r.step_time_s == pytest.approx(want)


def test_communication_and_fit(table):
    cfg = load_config(None, MODEL + ["parallel.sp=4"])
    costs = P.costs_for("h100", table)
    nv, ib = P.INTERCONNECTS["nvlink4"], P.INTERCONNECTS["ib-ndr"]
    fast = {(r.linear_method, r.softmax_method): r for r in P.plan(cfg, 4, costs, nv)}
    slow = {(r.linear_method, r.softmax_method): r for r in P.plan(cfg, 4, costs, ib)}
    for key, r in fast.items():
        assert r.exposed_comm_s > 0 and slow[key].exposed_comm_s > r.exposed_comm_s
        assert slow[key].compute_s == r.compute_s
    # LASP-2 gathers W-1 copies of the states; ZeCO and LASP-1 send each one hop: more bytes for LASP-2
    assert fast[("lasp2", "ring")].comm_bytes_per_gpu > fast[("zeco", "ring")].comm_bytes_per_gpu
    # the longest fitting length fits, one granule more does not
    r = fast[("zeco", "ring")]
    c = validate(replace(cfg, parallel=replace(cfg.parallel, linear_method="zeco")), 4)
    at = lambda n: P.memory_per_gpu(replace(c, data=replace(c.data, seq_len=n)))   # noqa: E731
    assert at(r.max_seq_len) <= TABLE["memory_bytes"] < at(r.max_seq_len + 64 * 8)


def test_offload_fits_the_host_too(table):
    """With offload, the longest length must also fit the host's share in pinned memory: a share smaller than the
    GPU's limit length needs shortens it, to a length whose pinned inputs fit and one granule more's do not."""
    cfg = load_config(None, MODEL + ["parallel.sp=1", "data.global_batch_size=1", "memory.blocks=offload",
                                     "schedule.activation_checkpointing=false"])
    costs, nv = P.costs_for("h100", table), P.INTERCONNECTS["nvlink4"]
    free = P.plan(cfg, 1, costs, nv, ("zeco",), ("ring",))[0]
    c = validate(cfg, 1)
    host = lambda n: P.host_per_process(replace(c, data=replace(c.data, seq_len=n)))   # noqa: E731
    assert free.host_gib * 2**30 == host(4096) > 0
    share = host(free.max_seq_len) / 3
    tight = P.plan(cfg, 1, costs, nv, ("zeco",), ("ring",), host_bytes=share)[0]
    assert 0 < tight.max_seq_len < free.max_seq_len
    assert host(tight.max_seq_len) <= share < host(tight.max_seq_len + 64)


def test_table_missing_head_dim(table):
    cfg = load_config(None, MODEL + ["model.n_heads=8", "model.n_kv_heads=8", "parallel.sp=1"])
    with pytest.raises(P.PlanError, match="head dim 32"):
        P.plan(cfg, 1, P.costs_for("h100", table), P.INTERCONNECTS["nvlink4"])


def test_recomputed_forward_and_memory_bound_work(tmp_path):
    """Whole-block checkpointing adds a third of the blocks' matmuls and the kernels' forward shares; per-stage
    checkpointing only its stage's; with a copy rate the memory-bound bytes and the optimizer are counted."""
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(dict(TABLE, copy_bytes_per_s=1e12)))
    costs = P.costs_for("h100", str(path))
    parts = {}
    for name, extra in (("off", []), ("whole", ["schedule.activation_checkpointing=true"]),
                        ("mlp", ["memory.mlp=checkpoint"])):
        parts[name] = P.compute_parts(validate(load_config(None, MODEL + ["parallel.sp=1"] + extra), 1), costs)
    off, whole, mlp = parts["off"], parts["whole"], parts["mlp"]
    assert off["recomputed forward"] == 0
    c = validate(load_config(None, MODEL + ["parallel.sp=1"]), 1)
    m, tokens = c.model, 4 * 4096
    D, I, F = m.dim, m.n_heads * m.hd, m.ffn
    blocks = 3 * 4 * D * I + (2 * D * I + 2 * D * m.n_kv_heads * m.hd) + 4 * 3 * D * F
    want = (tokens * 2 * blocks / 1e14 + P.LINEAR_FWD_SHARE * off["linear attention"]
            + P.SOFTMAX_FWD_SHARE * off["softmax attention"])
    assert whole["recomputed forward"] == pytest.approx(want)
    assert mlp["recomputed forward"] == pytest.approx(tokens * 2 * 4 * 3 * D * F / 1e14)
    assert off["memory-bound"] < mlp["memory-bound"] < whole["memory-bound"]
    assert off["memory-bound"] == pytest.approx(sum(P.memory_bound_bytes(c).values()) * tokens / 1e12)
    assert off["optimizer"] > 0
    assert "memory-bound" not in P.compute_parts(c, P.costs_for("h100", _write(tmp_path, TABLE)))


def _write(tmp_path, table) -> str:
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(table))
    return str(path)


def test_gradient_reduction_beside_the_backward(table):
    """DP × SP > 1: overlapped, the all-reduce shows only what two thirds of the compute cannot hide (or one
    layer's share); not overlapped, all of it."""
    costs, net = P.costs_for("h100", table), P.INTERCONNECTS["ib-ndr"]
    runs = {}
    for overlap in (True, False):
        cfg = load_config(None, MODEL + ["parallel.sp=1", f"optimizer.overlap_grad_reduce={str(overlap).lower()}"])
        runs[overlap] = P.plan(cfg, 4, costs, net, ("zeco",), ("ring",))[0]
    on, off = runs[True], runs[False]
    assert on.compute_s == off.compute_s and 0 < on.exposed_comm_s < off.exposed_comm_s
    c = validate(load_config(None, MODEL + ["parallel.sp=1"]), 4)
    assert on.exposed_comm_s == pytest.approx(max(off.exposed_comm_s - 2 / 3 * on.compute_s,
                                                  off.exposed_comm_s / c.model.n_layers))


def test_head_groups_recompute_the_linear_mixers(table):
    """Head groups recompute each group: the projections and the kernel's forward of the linear mixers and of
    the softmax mixers (q, k, v and o; 4 KV heads here)."""
    costs = P.costs_for("h100", table)
    base = P.compute_parts(validate(load_config(None, MODEL + ["parallel.sp=1"]), 1), costs)
    grouped = P.compute_parts(validate(load_config(None, MODEL + ["parallel.sp=1", "memory.mixer_head_groups=2"]),
                                       1), costs)
    c = validate(load_config(None, MODEL + ["parallel.sp=1"]), 1)
    m, tokens = c.model, 4 * 4096
    want = tokens * 2 * 3 * 4 * m.dim * m.n_heads * m.hd / 1e14 + P.LINEAR_FWD_SHARE * base["linear attention"]
    want_softmax = (tokens * 2 * (2 * m.dim * m.n_heads * m.hd + 2 * m.dim * m.n_kv_heads * m.hd) / 1e14
                    + P.SOFTMAX_FWD_SHARE * base["softmax attention"])
    assert base["softmax attention"] > 0 and want_softmax > 0
    assert base["recomputed forward"] == 0 and grouped["recomputed forward"] == pytest.approx(want + want_softmax)


def test_delta_rule_models(tmp_path):
    """A Gated DeltaNet hybrid: its layers' bytes are the delta rule's formulas plus the short convolutions'
    halos, its compute the table's delta-rule cost (with its own forward share where recomputed), and its
    mixers' memory-bound bytes count the convolutions and the normalised q, k; without the variant's cost the
    plan says how to measure it, and the relay, whose chain is local work, is refused."""
    from longscan.observe.comm import LinearShape, conv_halo_bytes, delta_method_bytes, total
    delta = MODEL + ["model.linear_variant=gated_deltanet", "parallel.sp=4", "data.micro_batch_size=1"]
    with pytest.raises(P.PlanError, match="linear_variant=gated_deltanet.*kernel_costs.py"):
        P.plan(load_config(None, delta), 4, P.costs_for("h100", _write(tmp_path, TABLE)), P.INTERCONNECTS["nvlink4"])
    lin = dict(TABLE["linear_s_per_token_head"], gated_deltanet={"64": 7e-9})
    costs = P.costs_for("h100", _write(tmp_path, dict(TABLE, linear_s_per_token_head=lin, copy_bytes_per_s=1e12)))
    nv = P.INTERCONNECTS["nvlink4"]
    rows = {r.linear_method: r for r in P.plan(load_config(None, delta), 4, costs, nv, softmax_methods=("ring",))}
    assert all(not r.note and r.step_time_s > 0 for r in rows.values())
    assert rows["lasp2"].comm_bytes_per_gpu > rows["zeco"].comm_bytes_per_gpu

    c = validate(load_config(None, delta + ["parallel.linear_method=lasp2"]), 4)
    shape = LinearShape(1, 4, 64, 64, 4)   # batch 1, 4 heads of 64, float32 states; halos of 3 bf16 tokens
    want = total(delta_method_bytes("lasp2", 1, 4, "zigzag", shape)) + total(conv_halo_bytes(1, 4, "zigzag", 1, 256,
                                                                                              2, 3))
    got = P.layer_traffic(c, 1)["layers.0.attn"]
    assert (got.sent, got.recv) == (want.sent * 4, want.recv * 4)            # 4 microbatches a step
    plain = validate(replace(c, model=replace(c.model, linear_variant="simple_gla")), 4)
    assert P.layer_traffic(c, 1)["layers.0.attn"].sent > P.layer_traffic(plain, 1)["layers.0.attn"].sent

    parts = P.compute_parts(c, costs)
    tokens = 4 * 4096 // 4
    # a rank's delta-rule work under SP: the segment's transition, then the outputs from the carry
    assert parts["linear attention"] == pytest.approx(P.DELTA_SP_LOCAL * 3 * tokens * 4 * 7e-9)
    one = validate(load_config(None, delta + ["parallel.sp=1"]), 1)
    assert P.compute_parts(one, costs)["linear attention"] == pytest.approx(3 * 4 * 4096 * 4 * 7e-9)
    whole = validate(replace(c, schedule=replace(c.schedule, activation_checkpointing=True)), 4)
    extra = P.compute_parts(whole, costs)["recomputed forward"] - tokens * 2 * (
        3 * P.linear_mixer_weights(c.model) + 2 * 256 * 256 * 2 + 4 * 3 * 256 * c.model.ffn) / 1e14
    assert extra == pytest.approx(P.DELTA_FWD_SHARE * parts["linear attention"]
                                  + P.SOFTMAX_FWD_SHARE * parts["softmax attention"])
    assert P.memory_bound_bytes(c)["linear mixers"] > P.memory_bound_bytes(plain)["linear mixers"]

    with pytest.raises(P.PlanError, match="delta_transition = 'relay' is not modelled"):
        P.plan(load_config(None, delta + ["parallel.delta_transition=relay"]), 4, costs, nv, ("zeco",), ("ring",))
