"""benchmarks/fused_ops.py on the CPU (the torch arithmetic, a few tokens): its cases are the model's sizes,
the fused ops agree with the eager code they replace, and a run gives one row per op and pass."""
import pytest
import torch

from benchmarks import fused_ops


def test_cases_have_the_model_sizes_and_fused_matches_eager():
    args = fused_ops.parse_args(["--tokens", "8", "--dtype", "float32"])
    cases = fused_ops.cases(args, torch.device("cpu"))
    assert [(c.op, c.shape) for c in cases] == [("swiglu", "[8, 5504]"), ("rope q", "[1, 8, 16, 128]"),
                                                ("rope k", "[1, 8, 4, 128]")]
    for c in cases:
        dy = torch.randn(c.eager(*c.inputs).shape)
        assert fused_ops.check(c, dy) < 1e-6, c.op


def test_a_run_gives_a_row_per_op_and_pass():
    rows = fused_ops.main(["--tokens", "8", "--dtype", "float32", "--iters", "1", "--warmup", "0"])
    assert [(r[0], r[2]) for r in rows] == [(op, p) for op in ("swiglu", "rope q", "rope k")
                                            for p in ("fwd", "fwd+bwd")]
    assert all(float(r[4]) > 0 for r in rows)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        fused_ops.parse_args(["--tokens", "0"])
