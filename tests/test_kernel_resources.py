"""benchmarks/tuning/kernel_resources.py compiles a kernel for sm_90a on a machine without a GPU and reads ptxas;
benchmarks/tuning/ptx_diff.py compares two checkouts' compiled kernels."""
import os
import re
import shutil
import sys

from harness import ROOT, run_compiled


def run_tool(*args):
    return run_compiled("benchmarks/tuning/kernel_resources.py", *args)


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


def run_ptx_diff(*args):
    return run_compiled("benchmarks/tuning/ptx_diff.py", *args)


def test_ptx_diff_finds_the_kernel_whose_launch_changed(tmp_path):
    """A base whose forward runs at three pipeline stages: its forward's PTX differs, its dv kernel's does not."""
    shutil.copytree(os.path.join(ROOT, "longscan"), tmp_path / "longscan",
                    ignore=shutil.ignore_patterns("__pycache__"))
    opts = tmp_path / "longscan/kernels/linear_attention/options.py"
    src = opts.read_text()
    assert '_CONFIG = {"fwd": LaunchConfig(64, 4, 2),' in src
    opts.write_text(src.replace('_CONFIG = {"fwd": LaunchConfig(64, 4, 2),',
                                '_CONFIG = {"fwd": LaunchConfig(64, 4, 3),'))
    out = run_ptx_diff("--base", str(tmp_path), "--kinds", "none", "--kernels", "fwd,dv")
    assert out.returncode == 1, out.stderr[-2000:]
    assert re.search(r"none\s+fwd\s+CHANGED", out.stdout), out.stdout
    assert re.search(r"none\s+dv\s+same", out.stdout), out.stdout


def test_ptx_diff_refuses_an_unknown_base():
    out = run_ptx_diff("--base", "no-such-revision", "--kinds", "none", "--kernels", "dv")
    assert out.returncode != 0 and "--base: 'no-such-revision' is neither" in out.stderr


def test_ptx_diff_drops_bare_labels_only():
    """A bare label line (an inlined helper's debug range) is not compared; a branch still names its target."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tuning"))
    import ptx_diff
    with_label = ptx_diff.normalise("$L__tmp3:\n\tmov.u32 \t%r1, 0;\n\t@%p1 bra \t$L__BB0_2;\n$L__BB0_2:\n")
    assert with_label == ["mov.u32 \t%r1, 0;", "@%p1 bra \t$L;"]


def test_cases_set_the_reset_switch_where_the_kernel_has_it():
    """kernel_resources.Case(resets=...) reaches the kernels' RESETS; without resets the pre-pass's chunk marks
    are a constexpr None (as the dispatch passes them), with resets a pointer."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tuning"))
    import kernel_resources as kr
    for resets in (False, True):
        consts, _ = kr.constants(kr.Case("fwd", 2, resets=resets))
        assert consts["RESETS"] is resets
        consts, _ = kr.constants(kr.Case("ops", 3, resets=resets))
        assert consts["RESETS"] is resets and (("steep_chunks" in consts) is not resets)
