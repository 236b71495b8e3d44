"""`longscan verify` end to end on two gloo processes: a row per rank and case with its worst error, exit
code 0; a tolerance the errors must exceed turns every row into FAIL with exit code 1; bad arguments stop
before any process starts."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from longscan.verify import Case, Outcome, table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = re.compile(r"^(\d+)\s+(linear|softmax)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(PASS|FAIL|SKIP|ERROR)")


def _verify(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "longscan.cli", "verify", *args], env=env, capture_output=True,
                       text=True, timeout=300)
    return p, [m.groups() for m in map(ROW.match, p.stdout.splitlines()) if m]


SUBSET = ["--nproc", "2", "--methods", "zeco", "lasp1", "allgather", "--layouts", "zigzag", "--kinds", "g_gamma",
          "per_key"]


def test_every_rank_and_case_passes_with_its_worst_error():
    p, rows = _verify(*SUBSET)
    assert p.returncode == 0, p.stdout + p.stderr
    expected = {(r, op, m, k) for r in "01" for op, m, k in [("linear", "zeco", "g_gamma"), ("linear", "zeco", "per_key"),
                                                            ("linear", "lasp1", "g_gamma"), ("linear", "lasp1", "per_key"),
                                                            ("softmax", "allgather", "causal")]}
    assert {(r[0], r[1], r[2], r[4]) for r in rows} == expected and len(rows) == len(expected)
    for rank, op, method, layout, kind, err, where, tol, status in rows:
        assert layout == "zigzag" and status == "PASS"
        assert 0 < float(err) < 1e-5, (method, kind, err)   # float32 against the float64 single-device result
    assert "5 cases x 2 ranks: all passed" in p.stdout


def test_errors_above_the_tolerance_fail():
    p, rows = _verify("--nproc", "2", "--methods", "lasp2", "ring", "--layouts", "contiguous", "--kinds", "scalar",
                      "--rtol", "1e-12")
    assert p.returncode == 1, p.stdout + p.stderr
    assert len(rows) == 4 and all(r[-1] == "FAIL" and float(r[5]) > 1e-12 for r in rows)
    assert "2 cases x 2 ranks: 4 FAILED" in p.stdout


def test_bad_arguments_stop_before_any_process_starts():
    p, _ = _verify("--tokens-per-rank", "3")
    assert p.returncode == 2 and "--tokens-per-rank must be an even number >= 2" in p.stderr
    p, _ = _verify("--methods", "lasp3")
    assert p.returncode == 2 and "invalid choice: 'lasp3'" in p.stderr


def test_table_counts_errors_as_failures():
    case = Case("linear", "zeco", "zigzag", "scalar")
    text = table([Outcome(0, case, "PASS", 1e-7, "o"), Outcome(1, case, "ERROR", float("nan"), "ValueError: x")],
                 1e-3)
    assert "ERROR (ValueError: x)" in text and "1 cases x 2 ranks: 1 FAILED" in text
