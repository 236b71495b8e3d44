"""The benchmarks' CPU-testable parts: the shared table writer, kernels.py's row type and arguments, and
sp_softmax.py end to end on one CPU process (W = 1), whose --check compares every method with float64."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))   # the SP scripts import bench_common by name

from benchmarks import kernels  # noqa: E402
from benchmarks.bench_common import markdown_table, sp_table  # noqa: E402


def test_markdown_table_and_its_width_check():
    assert markdown_table(["a", "b"], [["1", "2"], ["3", ""]]).splitlines() == \
        ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 |  |"]
    with pytest.raises(ValueError, match="3 cells, the header 2"):
        markdown_table(["a", "b"], [["1", "2", "3"]])


def test_sp_table_has_an_error_column_only_when_checked():
    row = dict(method="ring", T_local=8, ms=1.5, ratio_to_local=1.25, wait_ms=0.5, sent=2048, recv=1024)
    lines = sp_table([row]).splitlines()
    assert lines[0].endswith("recv/rank |") and lines[2] == "| ring | 8 | 1.50 | 1.25 | 0.50 | 2.0 KB | 1.0 KB |"
    assert sp_table([dict(row, rel_err=3e-7)]).splitlines()[2].endswith("| 3.0e-07 |")


def test_kernel_row_rate_and_fraction_of_floor():
    r = kernels.Row("ours linear g fwd", "B=1 T=8", 2.0, work=4e6, unit="GB/s", floor_ms=0.5)
    assert r.cells() == ["ours linear g fwd", "B=1 T=8", "2.000", "2 GB/s", "0.25", ""]
    assert kernels.Row("x", "s", 1.0).cells()[3:5] == ["", ""]
    with pytest.raises(ValueError, match="unit"):
        kernels.Row("x", "s", 1.0, unit="GiB")
    with pytest.raises(ValueError, match="ms must be positive"):
        kernels.Row("x", "s", 0.0)


def test_kernel_args_and_peer_versions():
    args = kernels.parse_args(["--only", "anchors,linear", "--kinds", "gk"])
    assert args.parts == ("anchors", "linear") and args.kinds == ("gk",)
    for bad in (["--kinds", "gk,zz"], ["--only", "lineal"]):
        with pytest.raises(SystemExit):
            kernels.parse_args(bad)
    assert kernels.peer_version("torch") == f"torch {torch.__version__}"
    assert kernels.peer_version("no-such-package-longscan") == "no-such-package-longscan (not installed)"


def test_timed_ulysses_times_its_hooks_and_matches_the_reference():
    import sp_softmax
    from longscan.kernels.softmax_attention import naive_attention
    from longscan.parallel.softmax import SoftmaxSPOptions
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 8, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2, 4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    timed = sp_softmax.TimedUlysses()
    o = timed.attend(q, k, v, SoftmaxSPOptions(scale=8 ** -0.5, causal=True, layout="contiguous", backend="torch"))
    o.backward(do)
    assert timed.local_s > 0
    ref = naive_attention(q.detach(), k.detach(), v.detach(), None, True)[0]
    assert torch.allclose(o.detach(), ref, atol=1e-10)


def test_sp_softmax_on_one_process_checks_every_method(tmp_path):
    try:
        import deepspeed.sequence.layer  # noqa: F401
        methods = ["ring", "allgather", "ulysses"]
    except ImportError:
        methods = ["ring", "allgather"]
    out = tmp_path / "sp.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "benchmarks/sp_softmax.py", "--lengths", "16", "--iters", "1",
                           "--warmup", "0", "--check", "--dtype", "float64", "--json", str(out),
                           "--methods", *methods], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["local kernel"] + methods
    for r in rows[1:]:
        assert r["rel_err"] < 1e-10, r
    assert "| ring | 16 |" in proc.stdout


def test_accuracy_script_measures_every_tensor(tmp_path):
    """accuracy_linear.py on CPU (torch backend against the naive recurrence, float32): every tensor is
    measured, the errors are float32 round-off, and the summary names each (decay, tensor) pair."""
    from benchmarks import accuracy_linear as acc
    out = tmp_path / "acc.jsonl"
    acc.main(["--grid", "quick", "--device", "cpu", "--backend", "torch", "--peer", "naive", "--dtypes", "float32",
              "--decays", "g", "gk", "--lengths", "65", "--json", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 * 2   # decays x (B, H) x (K, V) x states
    for r in rows:
        measured = {n for n, e in r["ours"].items() if e is not None}
        assert measured == ({"o", "dq", "dk", "dv", "dg"} | ({"ht", "dh0"} if r["case"]["states"] else set()))
        assert max(r["ours"][n] for n in measured) < 1e-5
        assert set(r["seconds"]) == {"ref", "ours", "bar"} and all(t >= 0 for t in r["seconds"].values())
    table = acc.summary(rows)
    assert "| float32 | gk | dg |" in table and "| float32 | g | dh0 |" in table


def test_accuracy_shards_cover_the_grid_once_and_summarize(tmp_path, capsys):
    """--shard I/N splits the grid's cases among processes without overlap; --summarize reads their files."""
    from benchmarks import accuracy_linear as acc
    common = ["--grid", "quick", "--device", "cpu", "--backend", "torch", "--peer", "naive", "--dtypes", "float32",
              "--decays", "g", "--lengths", "65"]
    for i in range(3):
        acc.main(common + ["--shard", f"{i}/3", "--json", str(tmp_path / f"acc{i}.jsonl")])
    names = [json.dumps(json.loads(line)["case"], sort_keys=True)
             for i in range(3) for line in (tmp_path / f"acc{i}.jsonl").read_text().splitlines()]
    assert len(names) == len(set(names)) == 2 * 2 * 2   # (B, H) x (K, V) x states, each once
    capsys.readouterr()
    acc.main(["--summarize"] + [str(tmp_path / f"acc{i}.jsonl") for i in range(3)])
    out = capsys.readouterr().out
    assert out.startswith("8 cases") and "| float32 | g | dg |" in out
    with pytest.raises(SystemExit, match="--shard"):
        acc.main(common + ["--shard", "3/3"])


def test_accuracy_error_of_a_non_finite_result_is_infinite():
    from benchmarks import accuracy_linear as acc
    ref = torch.ones(4, dtype=torch.float64)
    assert acc.rel(torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64), ref) == float("inf")
    assert acc.rel(ref * 1.5, ref) == pytest.approx(0.5)
    assert acc.rel(None, ref) is None


def test_linear_resets_checks_against_each_document(capsys):
    """linear_resets.py on CPU (torch backend, float32): the resets rows equal each document alone, both gate kinds."""
    from benchmarks import linear_resets
    linear_resets.main(["--total", "128", "--doc-len", "32", "--heads", "2", "--head-dim", "8", "--iters", "1",
                        "--warmup", "0", "--check"])
    rows = [line for line in capsys.readouterr().out.splitlines() if "| resets |" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["scalar", "per-key"]
    assert all(float(r.split("|")[5]) < 1e-5 for r in rows)


def test_packed_linear_checks_against_each_document(capsys):
    """packed_linear.py on CPU (torch backend, float32): the packed result equals each document alone."""
    from benchmarks import packed_linear
    packed_linear.main(["--total", "256", "--doc-len", "32", "--heads", "2", "--head-dim", "8", "--iters", "1",
                        "--warmup", "0", "--check"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| packed |"))
    assert float(row.split("|")[4]) < 1e-5
    assert "| per-document |" in out and "| unpacked |" in out


def table_rows(out: str) -> dict:
    """A benchmark's markdown table rows by their first cell, each row's cells split at "|"."""
    return {line.split("|")[1].strip(): line.split("|") for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| row")}


def test_packed_softmax_checks_against_each_document(capsys, tmp_path):
    """packed_softmax.py on CPU (torch backend, float32): the packed ring equals each document alone, and the
    batch of mean-length sequences does the work of equal documents (rate: work per second over unpacked's)."""
    from benchmarks import packed_softmax
    packed_softmax.main(["--total", "256", "--doc-len", "32", "--heads", "2", "--head-dim", "8", "--iters", "1",
                         "--warmup", "0", "--check", "--json", str(tmp_path / "p.json")])
    rows = table_rows(capsys.readouterr().out)
    assert float(rows["packed"][6]) < 1e-5
    assert set(rows) == {"unpacked", "packed", "per-document", "batched (8 x 32)"}
    assert float(rows["unpacked"][5]) == 1.0
    assert abs(float(rows["batched (8 x 32)"][4]) - 8 * 32 * 33 / 2 / (256 * 257 / 2)) < 1e-3


@pytest.mark.parametrize("world", [2, 3])
def test_ring_by_rank_computes_what_the_ring_does(world):
    """packed_softmax.RingByRank (the ring's steps rank by rank, the --world rows): its ranks' outputs and
    gradients, gathered, equal attention within each document over the whole sequence (float64), so its
    per-rank times are of the ring's own work."""
    from benchmarks.packed_softmax import RingByRank
    from longscan.kernels.softmax_attention import attention
    gen = torch.Generator().manual_seed(world)
    T, H, Hkv, D = 24 * world, 4, 2, 8
    q, k, v, do = (torch.randn(1, T, h, D, generator=gen, dtype=torch.float64) for h in (H, Hkv, Hkv, H))
    cu = torch.tensor([0, 5, 6, 6 + 2 * world, 40, T])     # a one-token document, one ending on a piece edge
    o, dq, dk, dv = RingByRank(q, k, v, do, cu, world, backend="torch").whole()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = torch.cat([attention(*(x[:, a:b] for x in leaves), causal=True, backend="torch")
                     for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    grads = torch.autograd.grad(ref, leaves, do)
    for got, want in zip((o, dq, dk, dv), (ref.detach(), *grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_packed_softmax_ring_rows_by_rank(capsys, tmp_path):
    """--world adds the ring's slowest rank, its efficiency, the ranks' imbalance (of time and of visible pairs) and
    its host time, --balance the ring over the balanced document order, --profile its slowest rank's operators; a
    ring of one, and --profile or --balance without --world, are refused."""
    from benchmarks import packed_softmax
    common = ["--total", "128", "--doc-len", "16", "--heads", "2", "--head-dim", "8", "--iters", "1", "--warmup", "0",
              "--json", str(tmp_path / "p.json")]
    packed_softmax.main(common + ["--world", "2"])
    rows = table_rows(capsys.readouterr().out)
    for name in ("unpacked, ring 2, slowest rank", "packed, ring 2, slowest rank"):
        assert float(rows[name][7]) > 0 and float(rows[name][8]) >= 1.0 and float(rows[name][9]) >= 1.0
        assert 0 < float(rows[name][10]) <= float(rows[name][2])   # its host time, within its wall time
    assert float(rows["unpacked, ring 2, slowest rank"][9]) == 1.0        # zigzag balances one document's pairs
    packed_softmax.main(common + ["--world", "4", "--balance"])
    rows = table_rows(capsys.readouterr().out)
    given, balanced = (float(rows[f"{n}, ring 4, slowest rank"][9]) for n in ("packed", "packed, balanced"))
    assert given > 1.05 and 1.0 <= balanced < given      # these documents' given order leaves rank pairs uneven
    packed_softmax.main(common + ["--world", "2", "--profile"])
    out = capsys.readouterr().out
    assert "## packed, ring 2, rank " in out and out.count("CPU ops:") == 2
    # each step of the slowest rank timed alone, with its plan's calls (the unpacked ring's step 0: 64 x 64 causal)
    assert out.count("| phase | step | from rank | ms |") == 2 and "| forward | 0 |" in out
    assert "64x64 causal |" in out and "| cast o |" in out
    for bad in (["--world", "1"], ["--profile"], ["--balance"]):
        with pytest.raises(SystemExit):
            packed_softmax.main(common + bad)


def test_ring_settings_runs_each_variant_and_restores_the_tables(capsys, tmp_path, monkeypatch):
    """tuning/ring_settings.py: a bad variant is refused before anything runs; each variant's settings are in
    force while its packed_softmax table is made, and the module's tables are as before afterwards."""
    pytest.importorskip("triton")
    from benchmarks.tuning import ring_settings
    from longscan.kernels.softmax_attention import triton_flash as tf
    assert ring_settings.parse_variant("shipped") == {}
    assert ring_settings.parse_variant("dkdv=64,32,4,2;fwd=128,64,8,2") == {
        "dkdv": dict(BM=64, BN=32, num_warps=4, num_stages=2), "fwd": dict(BM=128, BN=64, num_warps=8, num_stages=2)}
    for bad in ("dk=64,32,4,2", "dq=64,32,4", "fwd=a,b,c,d"):
        with pytest.raises(ValueError, match="kernel=BM,BN,num_warps,num_stages"):
            ring_settings.parse_variant(bad)
    before = (dict(tf.FWD_CONFIG), {k: dict(v) for k, v in tf.BWD_CONFIG.items()})
    seen = []
    monkeypatch.setattr(ring_settings.packed_softmax, "main",
                        lambda argv: seen.append((argv, dict(tf.BWD_CONFIG["dq"]), dict(tf.FWD_CONFIG))))
    monkeypatch.chdir(tmp_path)
    ring_settings.main(["--variants", "shipped", "dq=64,64,4,3", "--", "--total", "128"])
    assert [argv[:2] for argv, _, _ in seen] == [["--total", "128"]] * 2
    assert seen[0][1] == before[1]["dq"] and seen[1][1] == dict(BM=64, BN=64, num_warps=4, num_stages=3)
    assert (dict(tf.FWD_CONFIG), {k: dict(v) for k, v in tf.BWD_CONFIG.items()}) == before
    assert capsys.readouterr().out.count("### ") == 2
    with pytest.raises(ValueError, match="'dq=1'"):
        ring_settings.main(["--variants", "shipped", "dq=1"])


def test_kernel_costs_merges_measured_variants_into_a_table(monkeypatch):
    """kernel_costs.py --update: the measured variants' rows replace or join the table's, the rest of the table
    is kept, and the run is noted; an unknown --variants name is refused before any GPU work."""
    import sys

    from benchmarks import kernel_costs
    old = {"gpu": "h100", "commit": "abc", "linear_s_per_token_head": {"gla": {"128": 1.0}, "kda": {"128": 9.0}},
           "softmax_s_per_pair_head": {"128": 2.0}}
    new = {"device_name": "GPU", "torch": "t", "date": "d", "commit": "def",
           "linear_s_per_token_head": {"kda": {"128": 3.0}, "deltanet": {"128": 4.0}}}
    out = kernel_costs.merged(old, new, ["kda", "deltanet"])
    assert out["linear_s_per_token_head"] == {"gla": {"128": 1.0}, "kda": {"128": 3.0}, "deltanet": {"128": 4.0}}
    assert out["commit"] == "abc" and out["softmax_s_per_pair_head"] == {"128": 2.0}
    assert out["updates"] == [{"variants": ["kda", "deltanet"], "device_name": "GPU", "torch": "t", "date": "d",
                               "commit": "def"}]
    assert old["linear_s_per_token_head"]["kda"] == {"128": 9.0}          # the old table is not changed
    monkeypatch.setattr(sys, "argv", ["kernel_costs.py", "--variants", "kda,mamba"])
    with pytest.raises(SystemExit, match="unknown variant 'mamba'"):
        kernel_costs.main()


def test_accuracy_peer_tuning_takes_the_first_configuration_that_runs():
    """--peer-tuning first: an autotuner runs its configurations in its own order until one runs (one that does not
    compile or fit is skipped), times none after it, keeps that choice per key, and is itself again afterwards."""
    triton = pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.errors import OutOfResources
    from benchmarks import accuracy_linear as acc

    tried = []

    class Kernel:  # what an autotuner wraps: run(*args, **meta) with the config's meta-parameters
        arg_names = ["x", "n"]

        def run(self, *args, BLOCK, **meta):
            tried.append(BLOCK)
            if BLOCK == 128:
                raise OutOfResources(262144, 232448, "shared memory")

    def fn(x, n, BLOCK):  # the Python function the autotuner names
        pass

    kernel = Kernel()
    kernel.fn = fn
    configs = [triton.Config({"BLOCK": b}) for b in (128, 64, 32)]
    tuner = Autotuner(kernel, ["x", "n"], configs, ["n"], None, None,
                      do_bench=lambda call, quantiles: (call(), [1.0, 1.0, 1.0])[1])
    with acc.first_working_config():
        tuner.run(0, 5)
        assert tried == [128, 64, 64]  # 128 fails, 64 runs (timed, then the launch); 32 never compiled
        tried.clear()
        tuner.run(0, 5)
        assert tried == [64]           # the same key: the kept choice
    tried.clear()
    Autotuner(kernel, ["x", "n"], configs, ["n"], None, None,
              do_bench=lambda call, quantiles: (call(), [1.0, 1.0, 1.0])[1]).run(0, 5)
    assert sorted(tried) == [32, 64, 64, 128]  # outside: every configuration timed again


def test_accuracy_rounded_bar_keeps_its_error_before_rounding(tmp_path, capsys):
    """Where the peer refuses a case, the bar is the float32 computation rounded once; its error before that
    rounding is kept beside it, and the summary names each group's worst case with both."""
    from benchmarks import accuracy_linear as acc
    out = tmp_path / "acc.jsonl"
    acc.main(["--grid", "quick", "--device", "cpu", "--backend", "torch", "--peer", "no-such-backend",
              "--dtypes", "bfloat16", "--decays", "g", "--lengths", "65", "--json", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["bar_kind"] == "f32 rounded once" for r in rows)
    for r in rows:
        assert r["bar_unrounded"]["dq"] < r["bar"]["dq"]   # bf16's rounding of dq dominates the float32 error
    table = acc.summary(rows)
    assert "| bfloat16 | g | dq | ours | 8 |" in table and "unrounded)" in table


def test_accuracy_cases_run_alone_on_their_seeds(tmp_path):
    """A subset of the grid (--decays, --cases) draws the inputs the whole run drew for its cases; an unknown
    case name is refused."""
    from benchmarks import accuracy_linear as acc
    common = ["--grid", "quick", "--device", "cpu", "--backend", "torch", "--peer", "naive", "--dtypes", "float32"]
    acc.main(common + ["--decays", "g", "gk", "--json", str(tmp_path / "all.jsonl")])
    every = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert every[5]["case"]["decay"] == "gk"
    name = acc.Case(**every[5]["case"]).name
    acc.main(common + ["--decays", "gk", "--cases", name, "--json", str(tmp_path / "one.jsonl")])
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    for row in one + every:
        row.pop("seconds")
    assert len(one) == 1 and one[0] == every[5]
    with pytest.raises(SystemExit, match="--cases"):
        acc.main(common + ["--decays", "g", "--cases", "float32 g B9 T1 H1 K16 V16"])
