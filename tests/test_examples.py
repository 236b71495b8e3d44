"""The examples run and are exact on every rank (one spawn of 2 processes runs every example)."""
import os
import sys

import pytest

from harness import run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

LINEAR = [("zeco", "zigzag"), ("lasp2", "contiguous")]
SOFTMAX = [("ring", "zigzag"), ("allgather", "contiguous")]


def examples_worker(rank, world):
    import linear_sp
    import softmax_sp
    return {"linear": {case: linear_sp.main(*case) for case in LINEAR},
            "softmax": [softmax_sp.main(method, layout) for method, layout in SOFTMAX]}


@pytest.fixture(scope="module")
def examples():
    return run_distributed(examples_worker, 2)


@pytest.mark.parametrize("method,layout", LINEAR)
def test_linear_sp_example(examples, method, layout):
    errs = [res["linear"][(method, layout)] for res in examples]
    assert max(errs) < 1e-10


def test_softmax_sp_example(examples):
    errs = [res["softmax"] for res in examples]
    assert len(errs) == 2 and all(len(e) == 2 for e in errs)
    assert max(max(e) for e in errs) < 1e-10
