"""What packed documents add to the same call without documents, counted by benchmarks/packed_linear.py --count on
CPU (the torch backend; each aten operator is what a GPU would launch): the reset gate's select, once forward and
once backward, and nothing else: the resets are prepared once per cu_seqlens tensor."""


def test_packed_row_adds_one_select_each_way(capsys):
    from benchmarks import packed_linear
    packed_linear.main(["--total", "128", "--doc-len", "32", "--heads", "2", "--head-dim", "8", "--count"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): int(line.split("|")[2]) for line in out.splitlines()
            if line.startswith("| unpacked") or line.startswith("| packed")}
    assert rows["packed"] - rows["unpacked"] == 2, out
    extra = out.split("packed, beyond unpacked: ", 1)[1].splitlines()[1]
    assert extra == "where +2x +0 +0", extra
