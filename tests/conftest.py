import os
import sys

# Tests import helpers from this folder (tests/harness.py) by name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreted: runs Triton's CPU interpreter in worker processes (skipped "
                                       "where that interpreter cannot run the kernels)")


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("interpreted")]
    if not marked:
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
