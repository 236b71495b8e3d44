"""The scalar-gate linear-attention kernels as packed documents launch them (RESETS on: the reset arithmetic behind a
branch taken only by chunks that hold a reset) compile for sm_90a at the benchmark shapes (bf16, head dims 128, no
GPU needed), with the installed Triton and with LONGSCAN_TRITON_ALT's: Triton 3.6's pipeliner refused the branch
once a dot's result was used inside it, where 3.9 compiled it. Their registers and spills are
benchmarks/tuning/kernel_resources.py's to report (the finite-gate kernels spill a few bytes already)."""
import json

import pytest

from harness import TRITON_DIRS, run_compiled

pytest.importorskip("triton.backends.nvidia.compiler")

_COMPILE = r'''
import json
from benchmarks.tuning.kernel_resources import Case, resources
out = {name: resources(Case(name, 2, resets=True), 90) for name in ("fwd", "state", "dq", "dk", "dv")}
print(json.dumps(out))
'''


@pytest.mark.parametrize("triton_dir", TRITON_DIRS)
def test_reset_kernels_compile_for_hopper(triton_dir):
    proc = run_compiled("-c", _COMPILE, first_on_path=triton_dir)
    if proc.returncode and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out) == ["dk", "dq", "dv", "fwd", "state"]
    assert all(0 < r["registers"] <= 255 for r in out.values()), out
