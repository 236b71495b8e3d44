"""benchmarks/tuning/ptx_diff.py --family delta: the delta rule's kernels compiled for sm_90 at two checkouts."""
import os
import re
import shutil

import pytest

from harness import ROOT, run_compiled


def test_ptx_diff_delta_finds_the_kernel_whose_line_changed(tmp_path):
    """A base whose wy output kernel subtracts its in-chunk term: that kernel's PTX differs, the A kernel's does
    not."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    shutil.copytree(os.path.join(ROOT, "longscan"), tmp_path / "longscan",
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "longscan/kernels/delta_rule/triton/wy_output.py"
    src = path.read_text()
    line = "o = scale * (qs + tl.dot(qkc, vn, input_precision=PREC))"
    assert line in src
    path.write_text(src.replace(line, line.replace("qs + ", "qs - ")))
    out = run_compiled("benchmarks/tuning/ptx_diff.py", "--family", "delta", "--base", str(tmp_path),
                       "--kinds", "deltanet", "--kernels", "wy_output,wy_kkt")
    assert out.returncode == 1, out.stderr[-2000:]
    assert re.search(r"deltanet\s+wy_output\s+CHANGED", out.stdout), out.stdout
    assert re.search(r"deltanet\s+wy_kkt\s+same", out.stdout), out.stdout
