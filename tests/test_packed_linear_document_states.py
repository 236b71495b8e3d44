"""benchmarks/packed_linear.py with --states, --check and --profile on CPU: the per-document states row is timed
and checked against each document alone, and each row's profile tables are printed."""


def test_packed_linear_states_row_and_profile(capsys):
    from benchmarks import packed_linear
    packed_linear.main(["--total", "128", "--doc-len", "32", "--heads", "2", "--head-dim", "8", "--iters", "1",
                        "--warmup", "0", "--states", "--profile", "--check"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| packed, states |"))
    assert float(row.split("|")[4]) < 1e-5         # float32 against the float64 reference on CPU
    for row in ("unpacked", "packed", "packed, states", "per-document"):
        section = out.split(f"## {row}: 1 runs of forward+backward\n", 1)[1]
        assert section.startswith("CPU ops:\n"), row       # no CUDA table without a GPU
        table = section.split("Self CPU time total", 1)[0]
        assert "aten::" in table, row


def test_packed_linear_count(capsys):
    """--count on CPU: launches, bytes and elements for the packed rows, and what the states row adds by operator
    (its batched matmuls among them)."""
    from benchmarks import packed_linear
    packed_linear.main(["--total", "128", "--doc-len", "32", "--heads", "2", "--head-dim", "8", "--states", "--count"])
    out = capsys.readouterr().out
    counts = {line.split("|")[1].strip(): [int(x) for x in line.split("|")[2:5]] for line in out.splitlines()
              if line.startswith("| packed")}
    assert set(counts) == {"packed", "packed, states"} and "| ms |" not in out
    assert counts["packed, states"][0] > counts["packed"][0] > 0
    extra = out.split("packed, states, beyond packed: ", 1)[1]
    assert " bmm +" in extra and "index_select +" in extra
