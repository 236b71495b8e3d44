"""benchmarks/tuning/kernel_resources.py compiles a kernel for sm_90a on a machine without a GPU and reads ptxas."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args):
    # a subprocess: the kernel tests run Triton's interpreter in this one, and interpreted kernels do not compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "benchmarks/tuning/kernel_resources.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_reports_per_key_dk_resources():
    out = run_tool("--kinds", "gk", "--kernels", "dk")
    assert out.returncode == 0, out.stderr[-2000:]
    row = re.search(r"gk\s+dk\s+registers\s+(\d+)\s+spills\s+(\d+) /\s+(\d+) bytes.*shared\s+(\d+) bytes", out.stdout)
    assert row, out.stdout
    regs, _, _, shared = map(int, row.groups())
    assert 32 <= regs <= 255          # ptxas's limit per thread
    assert shared > 0                 # the kernel stages its tiles in shared memory


def test_rejects_unknown_kernel_and_kind():
    out = run_tool("--kernels", "dz")
    assert out.returncode != 0 and "--kernels: unknown kernel 'dz'" in out.stderr
    out = run_tool("--kinds", "gk,gq")
    assert out.returncode != 0 and "--kinds: unknown kind 'gq'" in out.stderr
    assert "registers" not in out.stdout   # refused before compiling the valid kind
