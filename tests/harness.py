"""Run a function in W CPU processes over gloo and collect what each rank returns.

Starting processes costs seconds, so a test module starts them once per world size, computes every case
inside the processes, and parametrised tests then assert on the cached results; the processes fork from a
server that has imported torch (and, under the interpreter, megatron and the model) once.
"""
from __future__ import annotations

import json
import os
import pickle
import queue as queue_mod
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def each_tp(sizes=(2, 1)):
    """Megatron's model-parallel state at each TP size in turn (the processes' group split that way), torn
    down after each: ``for tp in each_tp(): ...``."""
    from megatron.core import parallel_state as ps
    for tp in sizes:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
        try:
            yield tp
        finally:
            ps.destroy_model_parallel()


def tp_model(cfg, sp, tp: int, tp_rank: int | None = None, **kwargs):
    """A float32 ``HybridLM`` of ``cfg`` on this TP rank of ``tp`` (megatron's, unless ``tp_rank`` is given);
    kwargs go to the model (e.g. memory=MemoryOptions(...))."""
    from megatron.core import parallel_state as ps

    from longscan.models.model import HybridLM
    from longscan.training.parallel import stage_config
    rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    return HybridLM(cfg, stage_config(tp, 1, 1, cfg.dim, torch.float32), sp, tp_rank=rank, tp_size=tp, **kwargs)


_INTERPRETER_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(out, bounds):
    pid = tl.program_id(0)
    acc = 0.0
    for _ in range(pid, tl.load(bounds + pid)):   # a loop bound loaded from memory, as the kernels have
        acc += 1.0
    tl.store(out + pid, acc)

out = torch.zeros(1)
count[(1,)](out, torch.tensor([3], dtype=torch.int32))
assert out.item() == 3.0, out
"""


def triton_interpreter_works() -> bool:
    """Whether Triton's CPU interpreter runs a kernel here whose loop bound is loaded from memory. (Triton
    3.6's converts one-element arrays to ints, which numpy 2.4 made an error.) Probed once in a subprocess;
    the answer reaches spawned workers through the environment."""
    key = "LONGSCAN_TEST_INTERPRETER_WORKS"
    if key not in os.environ:
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(_INTERPRETER_PROBE)   # @triton.jit reads the kernel's source from its file
        try:
            env = {**os.environ, "TRITON_INTERPRET": "1"}
            ok = subprocess.run([sys.executable, f.name], env=env, capture_output=True, timeout=300).returncode == 0
        finally:
            os.unlink(f.name)
        os.environ[key] = "1" if ok else "0"
    return os.environ[key] == "1"


def run_distributed_interpreted(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """``run_distributed`` with Triton's interpreter in the workers. They inherit it from their start: Triton
    reads the variable as it decorates its own functions (at `import triton`), before the workers' code runs.
    This process's setting is restored after."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return run_distributed(fn, world_size, *args, timeout=timeout)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def run_compiled(*argv: str, first_on_path: str | None = None) -> subprocess.CompletedProcess:
    """``python *argv`` from the repository root in a process without Triton's interpreter (the kernel tests run
    the interpreter in this one, and interpreted kernels do not compile): for tests that compile kernels for a
    GPU target, or run the tuning scripts, without a GPU. first_on_path: a directory put before the repository
    on PYTHONPATH (another Triton install to compile with)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT if first_on_path is None else os.pathsep.join([first_on_path, ROOT])
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# the installed Triton, and another one when LONGSCAN_TRITON_ALT names a directory holding it (ptxas and
# register allocation differ between Triton releases: a kernel spill-free on one may spill on another)
TRITON_DIRS = [None] + ([os.environ["LONGSCAN_TRITON_ALT"]] if os.environ.get("LONGSCAN_TRITON_ALT") else [])


def assert_compiled_without_spills(script: str, *args: str, kernels: int, first_on_path: str | None = None) -> None:
    """Run a compile script (``python -c script *args`` by run_compiled) whose last line of output is a JSON
    object {kernel: {"regs": n, "spills": n}}: it exits cleanly, names ``kernels`` kernels, and none of them
    spills. Skipped where this Triton has no NVIDIA backend or no ptxas."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    proc = run_compiled("-c", script, *args, first_on_path=first_on_path)
    if proc.returncode and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == kernels, out
    spilled = {name: r for name, r in out.items() if r["spills"]}
    assert not spilled, spilled


def world_groups(worlds, world_size: int) -> dict:
    """{W: the sub-group of ranks 0..W-1} for each W of ``worlds`` below ``world_size``, and None (the default
    group) for ``world_size`` itself: one spawn of the largest world runs every smaller one too. Every rank must
    call it (each rank takes part in creating every group)."""
    return {w: (dist.new_group(list(range(w))) if w < world_size else None) for w in worlds}


def world_results(results: list, world: int) -> list:
    """World W's results from one spawn of the largest world (run_distributed's list, one dict a rank keyed by
    W, as the workers built with world_groups return): ranks 0..W-1's entries for W."""
    return [res[world] for res in results[:world]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, env):
    os.environ.clear()   # the caller's environment now (a forked worker starts with its server's)
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Pickle by value: tensors put on a torch queue travel as shared memory owned by this process,
        # which is gone by the time the parent reads them.
        queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # report the traceback to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# what a fork server imports once, so that each worker forked from it starts without importing them again;
# megatron and longscan's models import triton, whose mode a worker may still set (TRITON_INTERPRET) before its
# first import of it, so they are preloaded only where the interpreter is on from the start (the kernel tests'
# CPU runs)
PRELOAD = ["torch", "torch.distributed", "numpy", "harness", "longscan.parallel"]
PRELOAD_INTERPRETED = ["megatron.core", "longscan.models.model", "longscan.training.trainer"]
_server_interpret: str | None = None


def _context():
    """The fork server (started on first use, PRELOAD imported under this process's TRITON_INTERPRET), or spawn
    where TRITON_INTERPRET has changed since: Triton reads it at import, which a forked worker has behind it.
    Either way a worker takes the caller's environment at its start (``_worker``)."""
    global _server_interpret
    now = os.environ.get("TRITON_INTERPRET", "")
    if _server_interpret is None:
        _server_interpret = now
        mp.set_forkserver_preload(PRELOAD + (PRELOAD_INTERPRETED if now == "1" else []))
    return mp.get_context("forkserver" if now == _server_interpret else "spawn")


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """fn(rank, world_size, *args) in ``world_size`` gloo processes -> list of results by rank.

    ``fn`` must be a module-level function (it is pickled); its results must be picklable (tensors are
    fine: they are pickled by value).
    """
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, env)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    deadline = time.monotonic() + timeout
    try:
        received = 0
        while received < world_size and not errors:
            try:
                rank, status, out = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:  # a worker died without reporting (crash, import error): do not wait for it
                    errors.append(f"worker exited without a result: {dead}")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout} s")
                continue
            received += 1
            if status == "error":
                errors.append(f"rank {rank}:\n{out}")
            else:
                results[rank] = pickle.loads(out)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return results


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against the reference b."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gradient_errors(names, grads, local: dict, reference: dict, shard_of, group=None) -> dict:
    """{"d" + name: relative error} of this rank's gradients ``grads`` of the inputs ``names`` against the
    single-device ones in ``reference``: a sharded input's against shard_of(its reference gradient), a replicated
    one's (initial_state, g_gamma) summed over the group (None: the default group) first. Each gradient has its
    input's (local[name]) dtype and shape."""
    errs = {}
    for n, got in zip(names, grads):
        assert got.dtype == local[n].dtype and got.shape == local[n].shape, n
        if n in ("g_gamma", "initial_state"):  # replicated inputs: the gradients summed over ranks
            got = got.clone()
            dist.all_reduce(got, group=group)
            errs["d" + n] = rel_err(got, reference[n])
        else:
            errs["d" + n] = rel_err(got, shard_of(reference[n]))
    return errs
