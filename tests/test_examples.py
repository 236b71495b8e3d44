"""The examples run and are exact on every rank."""
import os
import sys

import pytest

from harness import run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def example_worker(rank, world, method, layout):
    import linear_sp
    return linear_sp.main(method, layout)


@pytest.mark.parametrize("method,layout", [("zeco", "zigzag"), ("lasp2", "contiguous")])
def test_linear_sp_example(method, layout):
    errs = run_distributed(example_worker, 2, method, layout)
    assert max(errs) < 1e-10


def softmax_example_worker(rank, world):
    import softmax_sp
    return [softmax_sp.main(method, layout) for method, layout in (("ring", "zigzag"), ("allgather", "contiguous"))]


def test_softmax_sp_example():
    errs = run_distributed(softmax_example_worker, 2)
    assert len(errs) == 2 and all(len(e) == 2 for e in errs)
    assert max(max(e) for e in errs) < 1e-10
