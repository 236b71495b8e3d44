import os
import sys

# Tests import helpers from this folder (tests/harness.py) by name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreted: runs Triton's CPU interpreter in worker processes (skipped on "
                                       "a GPU machine where that interpreter cannot run the kernels)")


def pytest_collection_modifyitems(config, items):
    """On a GPU machine (whose tests run the compiled kernels) the interpreted modules skip where Triton's
    interpreter cannot run them; on a CPU machine they are its only test of the kernels, so they run and fail."""
    marked = [item for item in items if item.get_closest_marker("interpreted")]
    import torch
    if not marked or not torch.cuda.is_available():
        return
    from harness import triton_interpreter_works
    if triton_interpreter_works():
        return
    from importlib.metadata import PackageNotFoundError, version

    import pytest

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "(not installed)"
    skip = pytest.mark.skip(reason=f"Triton {installed('triton')}'s CPU interpreter cannot run the kernels here "
                                   f"(numpy {installed('numpy')}; a loop bound loaded from memory fails)")
    for item in marked:
        item.add_marker(skip)
