"""`longscan verify`: every SP operator on this machine's devices and backend against one device.

    longscan verify [--nproc N] [--methods M ...] [--layouts L ...] [--kinds K ...] [--dtype D]
                    [--linear-backend B] [--softmax-backend B] [--tokens-per-rank T] [--rtol X] [--timeout S]

Each rank builds the same random global inputs, computes the single-device result on the whole sequence
(float64), runs the SP operator on its shard (forward and backward) and compares the output, the final
state and every input gradient. Rank 0 prints one row per rank and case with the worst relative error;
the exit code is 1 when any case fails. Started plainly it launches itself with torch.distributed.run
over every local GPU (NCCL), or over ``--nproc`` CPU processes (gloo, default 2); under torchrun it runs
as the launched rank.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longscan.distributed.layouts import LAYOUTS, shard
from longscan.distributed.sync import barrier
from longscan.kernels.linear_attention import BACKENDS as LINEAR_BACKENDS
from longscan.kernels.linear_attention import naive_recurrent_linear_attention
from longscan.kernels.softmax_attention import BACKENDS as SOFTMAX_BACKENDS
from longscan.kernels.softmax_attention import naive_attention
from longscan.parallel.linear import METHODS as LINEAR_METHODS
from longscan.parallel.linear import linear_attention
from longscan.parallel.softmax import METHODS as SOFTMAX_METHODS
from longscan.parallel.softmax import softmax_attention

KINDS = ("none", "g_gamma", "scalar", "per_key")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
# default tolerances on the relative L2 error: float32 leaves room for TF32 matmuls on GPUs
RTOL = {"float64": 1e-7, "float32": 1e-3, "bfloat16": 3e-2}
CPU_PROCESSES = 2


@dataclass(frozen=True)
class VerifyOptions:
    """What to run; validated before any process starts."""
    methods: tuple[str, ...] = LINEAR_METHODS + SOFTMAX_METHODS
    layouts: tuple[str, ...] = LAYOUTS
    kinds: tuple[str, ...] = KINDS
    dtype: str = "float32"
    linear_backend: str = "auto"
    softmax_backend: str = "auto"
    tokens_per_rank: int = 64
    rtol: float | None = None
    timeout_s: int = 300

    def __post_init__(self):
        for name, values, allowed in (("--methods", self.methods, LINEAR_METHODS + SOFTMAX_METHODS),
                                      ("--layouts", self.layouts, LAYOUTS), ("--kinds", self.kinds, KINDS),
                                      ("--dtype", (self.dtype,), tuple(DTYPES)),
                                      ("--linear-backend", (self.linear_backend,), LINEAR_BACKENDS),
                                      ("--softmax-backend", (self.softmax_backend,), SOFTMAX_BACKENDS)):
            unknown = [v for v in values if v not in allowed]
            if unknown or not values:
                raise ValueError(f"{name} must be one or more of {', '.join(allowed)}, got {', '.join(values)}")
        if self.tokens_per_rank < 2 or self.tokens_per_rank % 2:
            raise ValueError(f"--tokens-per-rank must be an even number >= 2 (zigzag: two pieces per rank), "
                             f"got {self.tokens_per_rank}")
        if self.rtol is not None and not self.rtol > 0:
            raise ValueError(f"--rtol must be a positive number, got {self.rtol}")
        if self.timeout_s < 1:
            raise ValueError(f"--timeout must be >= 1 second, got {self.timeout_s}")

    @property
    def tolerance(self) -> float:
        return self.rtol if self.rtol is not None else RTOL[self.dtype]


@dataclass(frozen=True)
class Case:
    operator: str   # "linear" | "softmax"
    method: str
    layout: str
    kind: str       # the decay kind of linear attention; "causal" for softmax


@dataclass(frozen=True)
class Outcome:
    rank: int
    case: Case
    status: str     # PASS | FAIL | SKIP | ERROR
    worst: float    # the worst relative error over every compared tensor (nan when none)
    where: str      # which tensor gave it, or why the case was skipped / raised


def cases(opts: VerifyOptions) -> list[Case]:
    out = [Case("linear", m, lay, kind) for m in LINEAR_METHODS if m in opts.methods
           for lay in opts.layouts for kind in opts.kinds]
    return out + [Case("softmax", m, lay, "causal") for m in SOFTMAX_METHODS if m in opts.methods
                  for lay in opts.layouts]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _gate(gen, *shape):   # exp(gate) in about [0.55, 0.95]: decays neither ~0 nor ~1
    return -0.05 - 0.55 * torch.rand(*shape, generator=gen, dtype=torch.float64)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


def _linear_case(case: Case, opts: VerifyOptions, rank: int, world: int, device) -> dict[str, float]:
    """Relative errors of this rank's output, final state and input gradients for one linear case."""
    B, H, K, V, T = 2, 2, 32, 32, opts.tokens_per_rank * world
    dtype = DTYPES[opts.dtype]
    gen = torch.Generator().manual_seed(1000 + KINDS.index(case.kind))   # the same inputs on every rank
    x = {"q": _randn(gen, B, T, H, K) * 0.5, "k": _randn(gen, B, T, H, K), "v": _randn(gen, B, T, H, V),
         "g": _gate(gen, B, T, H) if case.kind == "scalar" else _gate(gen, B, T, H, K) if case.kind == "per_key"
         else None, "g_gamma": _gate(gen, H) if case.kind == "g_gamma" else None,
         "initial_state": _randn(gen, B, H, K, V)}
    do = _randn(gen, B, T, H, V)
    dfinal = [_randn(gen, B, H, K, V) for _ in range(world)]   # every rank's copy of the final state's gradient
    # q, k, v in the checked dtype; gates and states in float32 (at least), as a model passes them. The
    # reference sees exactly these values, so the error measures the operator, not the rounding of inputs.
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    x = {n: (t.to(dtype if n in "qkv" else wide).double() if t is not None else None) for n, t in x.items()}
    ref = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o_ref, s_ref = naive_recurrent_linear_attention(ref["q"], ref["k"], ref["v"], ref["g"], ref["g_gamma"], None,
                                                    ref["initial_state"], True)
    names = [n for n, t in ref.items() if t is not None]
    grads_ref = dict(zip(names, torch.autograd.grad((o_ref, s_ref), [ref[n] for n in names],
                                                    (do, sum(dfinal)))))

    # the Triton kernels take g_gamma as a fixed buffer only
    triton = opts.linear_backend == "triton" or (opts.linear_backend == "auto" and device.type == "cuda")
    learn = [n for n in names if not (n == "g_gamma" and triton)]
    local = {}
    for n, t in x.items():
        if t is None:
            continue
        t = t if n in ("g_gamma", "initial_state") else shard(t, 1, None, case.layout)
        local[n] = t.to(device, dtype if n in "qkv" else wide).requires_grad_(n in learn)
    o, s = linear_attention(local["q"], local["k"], local["v"], local.get("g"), local.get("g_gamma"),
                            initial_state=local["initial_state"], output_final_state=True, method=case.method,
                            layout=case.layout, backend=opts.linear_backend)
    grads = torch.autograd.grad((o, s), [local[n] for n in learn],
                                (shard(do, 1, None, case.layout).to(device, o.dtype), dfinal[rank].to(device, s.dtype)))
    errs = {"o": rel_err(o, shard(o_ref, 1, None, case.layout)), "final_state": rel_err(s, s_ref)}
    for n, got in zip(learn, grads):
        if n in ("g_gamma", "initial_state"):   # replicated inputs: their gradients summed over the ranks
            errs["d" + n] = rel_err(_sum_over_ranks(got.double()), grads_ref[n])
        else:
            errs["d" + n] = rel_err(got, shard(grads_ref[n], 1, None, case.layout))
    return errs


def _softmax_case(case: Case, opts: VerifyOptions, rank: int, world: int, device) -> dict[str, float]:
    """Relative errors of this rank's output and q, k, v gradients for one causal softmax case (GQA)."""
    B, Hkv, D, T = 2, world, 32, opts.tokens_per_rank * world
    Hq = 2 * Hkv   # heads that divide by the group, so that Ulysses can shard them
    dtype = DTYPES[opts.dtype]
    gen = torch.Generator().manual_seed(2000)
    x = {"q": _randn(gen, B, T, Hq, D), "k": _randn(gen, B, T, Hkv, D), "v": _randn(gen, B, T, Hkv, D)}
    do = _randn(gen, B, T, Hq, D)
    x = {n: t.to(dtype).double() for n, t in x.items()}
    ref = {n: t.clone().requires_grad_() for n, t in x.items()}
    o_ref, _ = naive_attention(ref["q"], ref["k"], ref["v"], causal=True)
    grads_ref = dict(zip(ref, torch.autograd.grad(o_ref, list(ref.values()), do)))
    local = {n: shard(t, 1, None, case.layout).to(device, dtype).requires_grad_() for n, t in x.items()}
    o = softmax_attention(local["q"], local["k"], local["v"], causal=True, method=case.method, layout=case.layout,
                          backend=opts.softmax_backend)
    grads = torch.autograd.grad(o, list(local.values()), shard(do, 1, None, case.layout).to(device, o.dtype))
    errs = {"o": rel_err(o, shard(o_ref, 1, None, case.layout))}
    for n, got in zip(local, grads):
        errs["d" + n] = rel_err(got, shard(grads_ref[n], 1, None, case.layout))
    return errs


def run_case(case: Case, opts: VerifyOptions, rank: int, world: int, device) -> Outcome:
    if case.method == "ulysses" and importlib.util.find_spec("deepspeed") is None:
        return Outcome(rank, case, "SKIP", float("nan"), "needs `pip install deepspeed`")
    try:
        run = _linear_case if case.operator == "linear" else _softmax_case
        errs = run(case, opts, rank, world, device)
    except Exception as e:  # reported in the table; the ranks raise alike (the SP operators check it)
        return Outcome(rank, case, "ERROR", float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    where = max(errs, key=lambda n: (errs[n] != errs[n], errs[n]))   # nan counts as the worst
    worst = errs[where]
    return Outcome(rank, case, "PASS" if worst <= opts.tolerance else "FAIL", worst, where)


def table(outcomes: list[Outcome], tolerance: float) -> str:
    """The report: one row per rank and case, then a summary line."""
    head = ("rank", "operator", "method", "layout", "kind", "worst rel err", "in", "tolerance", "result")
    rows = [head] + [(str(o.rank), o.case.operator, o.case.method, o.case.layout, o.case.kind,
                      f"{o.worst:.2e}" if o.worst == o.worst else "-", o.where if o.status != "SKIP" else "-",
                      f"{tolerance:.0e}", o.status + ("" if o.status in ("PASS", "FAIL") else f" ({o.where})"))
                     for o in sorted(outcomes, key=lambda o: o.rank)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    bad = [o for o in outcomes if o.status in ("FAIL", "ERROR")]
    n_cases = len({o.case for o in outcomes})
    n_ranks = len({o.rank for o in outcomes})
    lines.append(f"{n_cases} cases x {n_ranks} ranks: " + (f"{len(bad)} FAILED" if bad else "all passed")
                 + (f", {sum(o.status == 'SKIP' for o in outcomes)} skipped"
                    if any(o.status == "SKIP" for o in outcomes) else ""))
    return "\n".join(lines)


def run_rank(opts: VerifyOptions) -> int:
    """Run every case as this launched rank; rank 0 prints the table. -> exit code (rank 0's: 1 on a failure)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=opts.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mine = [run_case(c, opts, rank, world, device) for c in cases(opts)]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    outcomes = [o for per_rank in everyone for o in per_rank]
    if rank == 0:
        print(f"longscan verify: {world} ranks over {dist.get_backend()} on {device.type}, {opts.dtype}, "
              f"backends {opts.linear_backend} (linear) / {opts.softmax_backend} (softmax), "
              f"{opts.tokens_per_rank} tokens per rank", flush=True)
        print(table(outcomes, opts.tolerance), flush=True)
    barrier()   # no rank leaves (and has the launcher stop the others) before the table is out
    dist.destroy_process_group()
    # rank 0 alone gives the verdict: a failing rank's exit would have the launcher end the others early
    return 1 if rank == 0 and any(o.status in ("FAIL", "ERROR") for o in outcomes) else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longscan verify",
                                description="Check every SP operator on this machine against one device.")
    p.add_argument("--nproc", type=int, default=0,
                   help=f"processes to start when not under torchrun (default: GPUs, else {CPU_PROCESSES} CPU "
                        "processes)")
    p.add_argument("--methods", nargs="+", choices=LINEAR_METHODS + SOFTMAX_METHODS,
                   default=list(LINEAR_METHODS + SOFTMAX_METHODS), help="SP methods, linear and softmax")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="decay kinds of the linear methods")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="of q, k, v (gates, states: float32)")
    p.add_argument("--linear-backend", choices=LINEAR_BACKENDS, default="auto", help="local linear kernels")
    p.add_argument("--softmax-backend", choices=SOFTMAX_BACKENDS, default="auto", help="local softmax kernels")
    p.add_argument("--tokens-per-rank", type=int, default=64)
    p.add_argument("--rtol", type=float, default=None,
                   help="tolerance on the relative error (default: " +
                        ", ".join(f"{d} {t:g}" for d, t in RTOL.items()) + ")")
    p.add_argument("--timeout", type=int, default=300, help="seconds a collective may wait (a hung rank)")
    return p


def options(args: argparse.Namespace) -> VerifyOptions:
    return VerifyOptions(methods=tuple(args.methods), layouts=tuple(args.layouts), kinds=tuple(args.kinds),
                         dtype=args.dtype, linear_backend=args.linear_backend,
                         softmax_backend=args.softmax_backend, tokens_per_rank=args.tokens_per_rank,
                         rtol=args.rtol, timeout_s=args.timeout)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        opts = options(args)
    except ValueError as e:
        print(f"longscan verify: {e}", file=sys.stderr)
        return 2
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return run_rank(opts)
    nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else CPU_PROCESSES)
    if nproc < 1:
        print(f"longscan verify: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    launch = ["--standalone", f"--nproc-per-node={nproc}", "--module", "longscan.verify"]
    try:
        run(get_args_parser().parse_args(launch + _without_nproc(argv)))
    except ChildFailedError:   # a rank exited non-zero: failed cases (rank 0 printed them) or a crash
        print("longscan verify: FAILED", file=sys.stderr)
        return 1
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The launched ranks' arguments: ``argv`` less ``--nproc N`` (they run under torchrun)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
