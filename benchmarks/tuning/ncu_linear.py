"""Hardware counters of the Triton linear-attention kernels: DRAM bytes, time and occupancy, kernel by kernel.

Two steps. On the GPU, under Nsight Compute, `run` does one warm-up forward+backward (compiles) and then one
more between cudaProfilerStart and cudaProfilerStop, so ncu sees only that one:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        --csv env PYTHONPATH=. python3 benchmarks/tuning/ncu_linear.py run --shape 16x4096 --kind gk > ncu.csv

Then, anywhere, `summary` reads that CSV and prints one row a kernel: µs, DRAM GB read / written, DRAM TB/s,
achieved occupancy, warp cycles per issued instruction:

    python benchmarks/tuning/ncu_linear.py summary ncu.csv

The DRAM bytes are what the kernels really move, after the L2 cache: a kernel far below the copy rate with
few bytes is bound by something else (issue, latency), and fewer bytes will not speed it up.
"""
from __future__ import annotations

import argparse
import csv
import io

KINDS = ("g_gamma", "g", "gk")
COLUMNS = {"gpu__time_duration.sum": "time", "dram__bytes_read.sum": "read", "dram__bytes_write.sum": "write",
           "Achieved Occupancy": "occupancy", "Warp Cycles Per Issued Instruction": "cycles_per_issue"}


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def summarise(text: str) -> list[dict]:
    """ncu's --csv output (its own '==PROF==' lines may be mixed in) -> one dict a kernel launch, in launch
    order: id, name, and the COLUMNS values it holds (time in ns, bytes, occupancy in %)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if not lines:
        raise ValueError("no ncu CSV rows found: run ncu with --csv (see this module's docstring)")
    kernels: dict[int, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if "ID" not in row or "Metric Name" not in row:
            raise ValueError("not ncu --csv output: it needs the columns ID, Kernel Name, Metric Name, Metric Value")
        k = kernels.setdefault(int(row["ID"]), {"id": int(row["ID"]), "name": row["Kernel Name"]})
        key = COLUMNS.get(row["Metric Name"])
        if key is not None and row["Metric Value"]:
            k[key] = _number(row["Metric Value"])
    return [kernels[i] for i in sorted(kernels)]


def _line(name: str, k: dict) -> str:
    rate = (k["read"] + k["write"]) / k["time"] / 1e3   # bytes / ns = GB/s; / 1e3: TB/s
    return (f"{name[:32]:32s} {k['time'] / 1e3:8.1f} {k['read'] / 1e9:8.3f} {k['write'] / 1e9:8.3f} {rate:6.2f} "
            f"{k.get('occupancy', float('nan')):6.1f} {k.get('cycles_per_issue', float('nan')):9.2f}")


def table(kernels: list[dict]) -> str:
    """The summary rows as text: kernels with the time and DRAM counters, and their total (its occupancy and
    cycles per issue: nan)."""
    out = [f"{'kernel':32s} {'us':>8s} {'read GB':>8s} {'write GB':>8s} {'TB/s':>6s} {'occ %':>6s} {'cyc/issue':>9s}"]
    counted = [k for k in kernels if all(c in k for c in ("time", "read", "write"))]
    out += [_line(k["name"], k) for k in counted]
    total = {c: sum(k[c] for k in counted) for c in ("time", "read", "write")}
    if total["time"]:
        out.append(_line("total", total))
    return "\n".join(out)


def run(shape: str, kind: str) -> None:
    """One forward+backward as the autograd op runs it (the forward keeps its operands; gates with their
    gradient, the constant decay without, as the other benchmarks), profiled alone."""
    import torch

    from benchmarks.tuning.tune_linear import inputs
    from longscan.kernels.linear_attention import triton as tc

    B, T = (int(x) for x in shape.split("x"))
    torch.manual_seed(0)
    q, k, v, g, gg, do = inputs(B, T, kind)

    def step():
        _, _, saved = tc.forward(q, k, v, g, gg, return_saved=True)
        tc.backward(q, k, v, g, gg, None, None, do, None, kind != "g_gamma", kv_states=saved)

    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def _shape(text: str) -> str:
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--shape must be BxT with positive integers (e.g. 16x4096), got {text!r}")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one profiled forward+backward (run it under ncu, on a GPU)")
    r.add_argument("--shape", type=_shape, default="16x4096")
    r.add_argument("--kind", choices=KINDS, default="gk")
    s = sub.add_parser("summary", help="one row a kernel from ncu's --csv output")
    s.add_argument("csv")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args.shape, args.kind)
    else:
        with open(args.csv) as f:
            print(table(summarise(f.read())))


if __name__ == "__main__":
    main()
