"""Every shape the Triton linear-attention kernels accept fits an H100 / H200 block's shared memory.

The kernels are compiled for sm_90a without a GPU (benchmarks/tuning/kernel_resources.py) in one subprocess
per module: this folder runs Triton's interpreter, whose kernels do not compile. Shared memory grows with the
element size and the head dims, so float32 at K = V = 128 with entering and leaving states is the largest of
each (kind, kernel); it is compiled for dk, dv and the state pass over (q, do), the kernels whose float32
settings differ from the others', at the kinds that asked for the most (no decay, the constant decay, the scalar
gate), the state pass under both float32_products (with tf32x3 at 3 stages it asked 262,656 bytes)."""
import functools
import json
import os
import sys

import pytest
import torch

from harness import run_compiled
from longscan.kernels.linear_attention import LinearKernelOptions
from longscan.kernels.linear_attention.triton import plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.tuning.kernel_resources import KERNELS, Case, launch  # noqa: E402

SHARED_LIMIT = 232_448   # bytes of shared memory a block may use on sm_90 (H100, H200)
CASES = [("dk", 1, "ieee"), ("dv", 1, "ieee"), ("dk", 0, "ieee"), ("dv", 2, "ieee"), ("state", 2, "ieee"),
         ("state", 2, "tf32x3")]

_SCRIPT = """
import json, sys, torch
from benchmarks.tuning.kernel_resources import Case, compile_case
from longscan.kernels.linear_attention import LinearKernelOptions
out = {}
for name, gate, products in json.loads(sys.argv[1]):
    case = Case(name, gate, torch.float32, states=True, from_start=name == "state")
    opts = LinearKernelOptions(float32_products=products)
    out[f"{name},{gate},{products}"] = compile_case(case, opts=opts).metadata.shared
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def _shared() -> dict:
    out = run_compiled("-c", _SCRIPT, json.dumps(CASES))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,gate,products", CASES)
def test_float32_head128_fits_shared_memory(name, gate, products):
    shared = _shared()[f"{name},{gate},{products}"]
    assert 0 < shared <= SHARED_LIMIT, f"{name} gate {gate} {products}: {shared} bytes of shared memory"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tool_compiles_the_dispatchs_launch_settings(dtype):
    """kernel_resources.py (and so the test above) compiles with the tiles and settings the dispatch launches."""
    opts = LinearKernelOptions()
    for name in KERNELS:
        for gate in ((3,) if name.startswith("ops") else range(4)):
            for K, V in ((16, 128), (128, 16), (128, 128)):
                dim = V if name in ("fwd", "dv", "state") else K
                assert launch(Case(name, gate, dtype, K, V), opts) == plan._launch(name, dim, gate, dtype, opts)


def test_float32_settings_differ_only_for_float32():
    opts = LinearKernelOptions()
    for name in ("dk", "dv"):
        assert plan._launch(name, 128, 1, torch.bfloat16, opts) == plan._launch(name, 128, 1, torch.float16, opts)
        assert plan._launch(name, 128, 1, torch.float32, opts) != plan._launch(name, 128, 1, torch.bfloat16, opts)


def test_float32_settings_validate_themselves():
    with pytest.raises(ValueError, match="config_f32: unknown kernel 'dz'"):
        LinearKernelOptions(config_f32={"dz": dict(block=64)})
    assert LinearKernelOptions().with_blocks(16).launch_config("dk", False, float32=True).block == 16
