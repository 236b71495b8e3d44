"""Accuracy of the linear-attention kernels: every tensor's error to a float64 reference, ours beside a peer.

For each case of the grid (dtype x T x (B, H) x (K, V) x decay kind x states) the same fresh random inputs go
through ``chunk_linear_attention`` with the backend under test, the peer backend (fla-core, when installed) and the
float64 reference (the chunked torch backend in float64), forward and backward with random output gradients. Each
tensor's error is ||x - ref|| / ||ref|| (||x|| where ref is exactly 0). Where the peer refuses a case (fla refuses
its gated backward on Triton < 3.7.1 on Hopper), the bar is the reference computed in float32 from the same inputs
(q, k, v and the output gradient do in the case's dtype: do is the gradient of an output in that dtype, so every
backend sees it rounded) and rounded once to that dtype. Prints per (dtype, decay, tensor) the worst and
median ratio ours / bar and the worst errors, and writes every case to --json (JSON lines).

Decay kinds: none, g_gamma (a learnable constant decay: its gradient is asked for, which ours takes in forward
mode in float32 beside the kernels), g, gk, gk_steep, and (not in the default list) g_gamma_fixed: the constant
decay without its gradient.

--options FIELD=VALUE[,FIELD=VALUE] also runs ours with those LinearKernelOptions fields on the same inputs,
one more row a tensor ("ours[FIELD=VALUE]"), so one run measures a setting beside the defaults; an item
per_key_dq_split applies LinearKernelOptions.with_per_key_dq_split():

    PYTHONPATH=. python benchmarks/accuracy_linear.py --json acc.json            # the whole grid (GPU)
    PYTHONPATH=. python benchmarks/accuracy_linear.py --decays gk g_gamma_fixed --options dq_factor_f32=true
    PYTHONPATH=. python benchmarks/accuracy_linear.py --grid quick --device cpu --backend torch --peer naive
    PYTHONPATH=. python benchmarks/accuracy_linear.py --cases "bfloat16 g_gamma B1 T65 H1 K64 V64"  # one case

Each kernel family (head sizes x decay kind) compiles ours, and the peer's autotuners would compile and time every
configuration of theirs: that, not the measuring, was most of a GPU run. An accuracy run needs a configuration, not
the fastest, so by default (--peer-tuning first) every Triton autotuner takes the first of its configurations, in
its own order, that compiles and runs (the choice moves only the order of float32 sums); --peer-tuning full times
them all as in training. A run spreads the grid over processes, one family each, that compile side by side on a
machine with as many cores (and nothing else running), then summarises their JSON lines:

    for i in $(seq 0 14); do PYTHONPATH=. python benchmarks/accuracy_linear.py --shard $i/15 --json acc$i.json & done; wait
    PYTHONPATH=. python benchmarks/accuracy_linear.py --summarize acc*.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import statistics
import time
import zlib

import torch

from benchmarks.bench_common import markdown_table
from longscan.kernels.linear_attention import LinearKernelOptions, chunk_linear_attention

DECAYS = ("none", "g_gamma", "g", "gk", "gk_steep")
EXTRA_DECAYS = ("g_gamma_fixed",)
TENSORS = ("o", "ht", "dq", "dk", "dv", "dg", "dh0")
GRIDS = {
    "full": dict(T=(1, 63, 64, 65, 1000, 4096), BH=((1, 1), (2, 4)), KV=((64, 64), (128, 128), (64, 128))),
    "quick": dict(T=(1, 65, 200), BH=((1, 1), (2, 2)), KV=((16, 16), (32, 16))),
}


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    decay: str
    T: int
    B: int
    H: int
    K: int
    V: int
    states: bool

    @property
    def name(self) -> str:
        return (f"{self.dtype} {self.decay} B{self.B} T{self.T} H{self.H} K{self.K} V{self.V}"
                + (" states" if self.states else ""))


def make_inputs(case: Case, device, seed: int) -> dict:
    """Fresh random float64 inputs (gates: exp(g) in about [0.55, 0.95]; steep: g down to about -7.4)."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def gate(*shape):
        return -0.05 - 0.55 * torch.rand(*shape, generator=gen, dtype=torch.float64)

    x = dict(q=rand(B, T, H, K), k=rand(B, T, H, K), v=rand(B, T, H, V), g=None, g_gamma=None,
             h0=rand(B, H, K, V) if case.states else None, do=rand(B, T, H, V),
             dht=rand(B, H, K, V) if case.states else None)
    if case.decay in ("g_gamma", "g_gamma_fixed"):
        x["g_gamma"] = gate(H)
    elif case.decay == "g":
        x["g"] = gate(B, T, H)
    elif case.decay == "gk":
        x["g"] = gate(B, T, H, K)
    elif case.decay == "gk_steep":
        x["g"] = -torch.exp(-3 + 5 * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64))
    return {n: (t.to(device) if t is not None else None) for n, t in x.items()}


def run(case: Case, x: dict, backend: str, dtype: torch.dtype, gate_grad: bool,
        options: LinearKernelOptions | None = None) -> dict:
    """Forward and backward through the public op; every output and gradient as float64. options: ours' kernel
    options (None: the defaults; only for backends that take them)."""
    cast = {n: (t.to(dtype) if n in ("q", "k", "v") else t.float() if dtype != torch.float64 else t)
            for n, t in x.items() if t is not None and n not in ("do", "dht")}
    gate_grad = gate_grad and case.decay != "g_gamma_fixed"
    leaves = {n: t.detach().requires_grad_(n != "g_gamma" or gate_grad) for n, t in cast.items()}
    extra = dict(options=options) if options is not None else {}
    o, ht = chunk_linear_attention(leaves["q"], leaves["k"], leaves["v"], g=leaves.get("g"),
                                   g_gamma=leaves.get("g_gamma"), initial_state=leaves.get("h0"),
                                   output_final_state=case.states, backend=backend, **extra)
    outs, grads = [o], [x["do"].to(o.dtype)]
    if case.states:
        outs.append(ht)
        grads.append(x["dht"].to(ht.dtype))
    torch.autograd.backward(outs, grads)
    res = dict(o=o, ht=ht, dq=leaves["q"].grad, dk=leaves["k"].grad, dv=leaves["v"].grad,
               dh0=leaves["h0"].grad if "h0" in leaves else None)
    gate = leaves.get("g", leaves.get("g_gamma"))
    res["dg"] = gate.grad if gate is not None and gate.requires_grad else None
    return {n: (t.detach().double() if t is not None else None) for n, t in res.items()}


def rel(a, ref) -> float | None:
    if a is None or ref is None:
        return None
    if not torch.isfinite(a).all():
        return float("inf")
    if not ref.any():   # an exact 0 (dg at T = 1 without an initial state): the residue itself
        return a.norm().item()
    return ((a - ref).norm() / ref.norm()).item()


def measure(case: Case, backend: str, peer: str, device, seed: int,
            variant: tuple[str, LinearKernelOptions] | None = None) -> dict:
    """One case: ours, the bar and the reference on the same fresh inputs; variant (name, options): ours again
    with those options, under row["variant"][name]."""
    dtype = getattr(torch, case.dtype)
    x = make_inputs(case, device, seed)
    clock = Clock(device)
    # our backend may refuse a g_gamma that requires grad; then dg is not measured for it
    ref = run(case, x, "torch", torch.float64, gate_grad=True)
    clock.lap("ref")
    row = dict(case=dataclasses.asdict(case), ours={}, bar={}, bar_kind=peer)
    try:
        ours = run(case, x, backend, dtype, gate_grad=True)
    except ValueError as e:
        if case.decay != "g_gamma":
            raise
        row["ours_note"] = f"g_gamma gradient refused: {e}"
        ours = run(case, x, backend, dtype, gate_grad=False)
    clock.lap("ours")
    if variant is not None:
        other = run(case, x, backend, dtype, gate_grad=True, options=variant[1])
        row["variant"] = {variant[0]: {n: rel(other[n], ref[n]) for n in TENSORS}}
        clock.lap("variant")
    try:
        bar = run(case, x, peer, dtype, gate_grad=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the peer (its own error types) falls back to rounding
        row["peer_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        row["bar_kind"] = "f32 rounded once"
        # the same inputs as ours (q, k, v and do rounded to the case's dtype: ours gets do as the gradient of an
        # output in that dtype): only the computation differs
        rounded = {n: (t.to(dtype).double() if n in ("q", "k", "v", "do") else t) for n, t in x.items()}
        f32 = run(case, rounded, "torch", torch.float32, gate_grad=True)
        bar = {n: (t.to(dtype).double() if t is not None else None) for n, t in f32.items()}
        # before its rounding too: where a tensor has few elements (dg_gamma: one a head) that last rounding
        # alone can land near or far from the reference, so a ratio to the rounded bar is partly its luck
        row["bar_unrounded"] = {n: rel(f32[n], ref[n]) for n in TENSORS}
    clock.lap("bar")
    for n in TENSORS:
        row["ours"][n], row["bar"][n] = rel(ours[n], ref[n]), rel(bar[n], ref[n])
    row["seconds"] = clock.laps  # compiles included: a grid's time is mostly first launches
    return row


class Clock:
    """Wall seconds between laps, the device synchronised at each."""

    def __init__(self, device):
        self.device, self.laps, self.t = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        self.laps[name], self.t = round(t - self.t, 3), t


@contextlib.contextmanager
def first_working_config():
    """Within it every Triton autotuner (fla-core's subclass too) takes the first of its configurations that
    compiles and runs, untimed after that one, instead of timing each; the choice per key is kept as usual."""
    from triton.runtime.autotuner import Autotuner
    run, bench = Autotuner.run, Autotuner._bench

    def run_one(self, *args, **kwargs):
        self._longscan_found = False  # a new key's benchmark loop starts here; cached keys never call _bench
        return run(self, *args, **kwargs)

    def bench_one(self, *args, config, **meta):
        if self._longscan_found:
            return [float("inf")] * 3
        timing = bench(self, *args, config=config, **meta)
        self._longscan_found = math.isfinite(timing[0] if isinstance(timing, (list, tuple)) else timing)
        return timing

    Autotuner.run, Autotuner._bench = run_one, bench_one
    try:
        yield
    finally:
        Autotuner.run, Autotuner._bench = run, bench


def cases(grid: str, dtypes, decays=DECAYS) -> list[Case]:
    g = GRIDS[grid]
    # (head sizes, decay) varies fastest: --shard I/15 gives each process one of the 15 kernel families of the
    # default decays (its compiles and the peer's autotuning done once), every family advancing at the same pace
    return [Case(dt, d, T, B, H, K, V, s) for dt, T, (B, H), s, (K, V), d
            in itertools.product(dtypes, g["T"], g["BH"], (False, True), g["KV"], decays)]


def seed_of(case: Case, grid: str, base: int) -> int:
    """The case's seed: base + its place in the grid's default run (both dtypes, DECAYS, every length), so a run
    of a subset (--dtypes, --decays, --lengths, --cases) draws the inputs the whole run drew for those cases;
    cases outside the default run (other decays or dtypes) take a seed from their name past those places."""
    default = cases(grid, ("bfloat16", "float32"))
    if case in default:
        return base + default.index(case)
    return base + len(default) + zlib.crc32(case.name.encode()) % 1_000_000


def summary(rows: list[dict]) -> str:
    """Markdown: per dtype, decay, tensor (and ours' options, where a variant ran), the number of cases, the
    median and worst ratio ours / bar, the case of the worst ratio (with ours and the bar there, and the bar before
    its rounding where it is the rounded float32 computation), and the worst errors of both."""
    groups = {}
    for r in rows:
        c = r["case"]
        where = Case(**c).name.split(" ", 2)[2]   # the dtype and decay are the row's own columns
        runs = [("ours", r["ours"])] + [(f"ours[{name}]", errs) for name, errs in r.get("variant", {}).items()]
        for n in TENSORS:
            for who, errs in runs:
                if errs[n] is not None:
                    unrounded = r.get("bar_unrounded", {}).get(n)
                    groups.setdefault((c["dtype"], c["decay"], n, who), []).append(
                        (errs[n], r["bar"][n], r["bar_kind"], where, unrounded))
    cells = []
    for (dt, d, n, who), vals in groups.items():
        rated = [(a / max(b, 1e-30), a, b, case, u) for a, b, _, case, u in vals if b is not None]
        worst_bar = max((b for _, b, _, _, _ in vals if b is not None), default=float("nan"))
        at = ""
        if rated:
            _, a, b, case, u = max(rated, key=lambda x: x[0])
            at = f"{case}: {a:.1e} / {b:.1e}" + (f" ({u:.1e} unrounded)" if u is not None else "")
        ratios = [x[0] for x in rated]
        cells.append([dt, d, n, who, str(len(vals)), f"{statistics.median(ratios):.2f}" if ratios else "",
                      f"{max(ratios):.2f}" if ratios else "", at, f"{max(a for a, *_ in vals):.1e}",
                      f"{worst_bar:.1e}", "/".join(sorted({k for _, _, k, _, _ in vals}))])
    return markdown_table(["dtype", "decay", "tensor", "ours", "cases", "median ours/bar", "worst ours/bar",
                           "worst ratio's case: ours / bar", "worst ours", "worst bar", "bar"], cells)


# --options items without "=": LinearKernelOptions methods that set several fields together
PRESETS = {"per_key_dq_split": LinearKernelOptions.with_per_key_dq_split}


def options_of(text: str) -> tuple[str, LinearKernelOptions]:
    """"ITEM[,ITEM]" -> (the text, LinearKernelOptions): an item FIELD=VALUE sets a field (VALUE true/false or an
    int: the boolean and integer fields; a word: the string fields), an item named in PRESETS applies that method
    after the fields; checked."""
    fields = {f.name for f in dataclasses.fields(LinearKernelOptions)}
    words = {f.name for f in dataclasses.fields(LinearKernelOptions) if f.type in ("str", str)}
    kw, presets = {}, []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep and name in PRESETS:
            presets.append(PRESETS[name])
            continue
        if not sep or name not in fields:
            raise SystemExit(f"--options: expected FIELD=VALUE with FIELD one of {sorted(fields)}, or one of "
                             f"{sorted(PRESETS)}, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            kw[name] = low == "true"
        elif value.isdigit():
            kw[name] = int(value)
        elif name in words:
            kw[name] = value
        else:
            raise SystemExit(f"--options {name}: expected true, false or an int, got {value!r}")
    try:
        opts = LinearKernelOptions(**kw)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--options: {e}") from None
    for preset in presets:
        opts = preset(opts)
    return text, opts


def shard_of(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N), checked."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must be I/N with integers, got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=list(GRIDS), default="full")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--decays", nargs="+", default=list(DECAYS), choices=DECAYS + EXTRA_DECAYS)
    p.add_argument("--options", default=None, metavar="FIELD=VALUE[,...]",
                   help="also run ours with these LinearKernelOptions fields, beside the defaults")
    p.add_argument("--backend", default="triton")
    p.add_argument("--peer", default="fla")
    p.add_argument("--peer-tuning", choices=("first", "full"), default="first",
                   help="Triton autotuners (the peer's): the first configuration that runs, or every one timed")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="a subset of the grid's T")
    p.add_argument("--cases", nargs="+", default=None, metavar="NAME",
                   help='only these cases, by name (e.g. "bfloat16 g_gamma B1 T65 H1 K64 V64")')
    p.add_argument("--json", default=None, help="write every case here, one JSON object a line")
    p.add_argument("--shard", default="0/1", help="I/N: run every N-th case of the grid from the I-th")
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                   help="print the summary of these --json files (measure nothing)")
    a = p.parse_args(argv)
    if a.summarize:
        rows = [json.loads(line) for f in a.summarize for line in open(f) if line.strip()]
        print(f"{len(rows)} cases")
        print(summary(rows))
        return 0
    shard, shards = shard_of(a.shard)
    variant = options_of(a.options) if a.options else None
    device = torch.device(a.device)
    a.lengths = a.lengths or GRIDS[a.grid]["T"]
    print(f"backend {a.backend} vs {a.peer} on {device}, torch {torch.__version__}", flush=True)
    rows = []
    log = open(a.json, "w") if a.json else None  # one JSON line a case, so a run cut short keeps its rows
    todo = [c for c in cases(a.grid, a.dtypes, tuple(a.decays)) if c.T in a.lengths]
    if a.cases and not set(a.cases) <= {c.name for c in todo}:
        raise SystemExit(f"--cases: not in this run's grid: {sorted(set(a.cases) - {c.name for c in todo})}")
    # no Triton autotuner runs on the CPU (and the CPU path need not have triton)
    first = a.peer_tuning == "first" and device.type == "cuda"
    tuning = first_working_config() if first else contextlib.nullcontext()
    with tuning:
        for case in todo[shard::shards]:
            if a.cases and case.name not in a.cases:
                continue
            rows.append(measure_and_log(case, a, device, seed_of(case, a.grid, a.seed), variant, log))
    print(summary(rows))
    return 0


def measure_and_log(case: Case, a, device, seed: int, variant, log) -> dict:
    """One case measured, written to the JSON log (if any) and named on stdout with its worst error."""
    row = measure(case, a.backend, a.peer, device, seed, variant)
    if log:
        log.write(json.dumps(row) + "\n")
        log.flush()
    worst = max((v for v in row["ours"].values() if v is not None), default=0.0)
    laps = " ".join(f"{k} {v:.1f}" for k, v in row["seconds"].items())
    print(f"{case.name:52s} worst ours {worst:.1e}  s: {laps}"
          + (f"  [{row['peer_note']}]" if "peer_note" in row else ""),
          flush=True)
    return row


if __name__ == "__main__":
    raise SystemExit(main())
