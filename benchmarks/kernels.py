"""Kernel benchmarks: longscan's Triton kernels next to their peers, in one run, on one GPU.

Measures the device's two ceilings first (device-to-device copy, bf16 matmul), then
  linear attention (constant decay g_gamma, scalar gate g, per-key gate g), forward and forward+backward,
    ours vs fla-core's chunk_simple_gla / chunk_gla, at B=16×T=4096 and B=1×T=65536, 16 heads × 128;
  one SP rank's local work as the SP operators run it (both forward schedules; the backward with its
    reverse collective beside the dq kernel or before it), with a stand-in collective, vs the plain kernel;
  flash attention causal forward and forward+backward, ours vs torch SDPA flash and cuDNN.
Prints a markdown table and writes it (with device, versions, date, commit) to --out; the peers' versions
are read from their installed packages. docs/benchmarks.md records the current results.

    PYTHONPATH=. python benchmarks/kernels.py --out benchmarks/kernels_rows.md
    PYTHONPATH=. python benchmarks/kernels.py --only anchors,linear --kinds gk   # the per-key rows alone
(--kinds picks the decay kinds of the linear and the SP rows.)
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
from dataclasses import dataclass
from importlib import metadata

import torch
import triton
from triton.runtime.errors import TritonError

from benchmarks.bench_common import markdown_table
from longscan.kernels.linear_attention import triton as tc
from longscan.kernels.softmax_attention import triton_flash as tf

LINEAR_KINDS = ("g_gamma", "g", "gk")   # constant decay, scalar gate, per-key gate
PARTS = ("check", "anchors", "linear", "linear_long", "sp", "flash")
_DIV = {"GB/s": 1e6, "TFLOP/s": 1e9, "": 1}   # bytes or FLOPs per ms -> unit
# What a peer's kernel may raise on a shape or device it does not support (compile errors, out of
# resources or memory, "no available kernel"): its row is left out and the reason printed.
PEER_ERRORS = (RuntimeError, ValueError, TritonError)
TABLE_HEADER = ("kernel", "shape", "ms", "rate", "fraction of floor", "note")


@dataclass(frozen=True)
class Row:
    """One measurement: ``work`` bytes or FLOPs (``unit``) in ``ms``; ``floor_ms`` the device's floor for it."""
    name: str
    shape: str
    ms: float
    work: float = 0.0
    unit: str = ""
    floor_ms: float = 0.0
    note: str = ""

    def __post_init__(self):
        if self.unit not in _DIV:
            raise ValueError(f"unit must be one of {tuple(_DIV)}, got {self.unit!r}")
        if not self.ms > 0:
            raise ValueError(f"ms must be positive, got {self.ms!r}")

    def rate(self) -> str:
        return f"{self.work / self.ms / _DIV[self.unit]:.0f} {self.unit}" if self.work else ""

    def fraction(self) -> str:
        return f"{self.floor_ms / self.ms:.2f}" if self.floor_ms else ""

    def cells(self) -> list[str]:
        return [self.name, self.shape, f"{self.ms:.3f}", self.rate(), self.fraction(), self.note]


def record(rows: list[Row], r: Row) -> None:
    """Append ``r`` and print it at once (a long run shows its progress)."""
    rows.append(r)
    print(f"{r.name:58s} {r.shape:22s} {r.ms:8.3f} ms  {r.rate():>14s}  floor-frac {r.fraction():>5s} {r.note}",
          flush=True)


def peer_version(package: str) -> str:
    """``package`` and its installed version, as the table names the peer."""
    try:
        return f"{package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return f"{package} (not installed)"


def bench(fn, ms_warm=100, ms_rep=400):
    return triton.testing.do_bench(fn, warmup=ms_warm, rep=ms_rep, return_mode="median")


def bench_graph(fn, ms_rep=400):
    """fn captured once in a CUDA graph, its replays timed: the GPU's time without the host's launches."""
    fn()   # compile outside the capture
    return triton.testing.do_bench_cudagraph(fn, rep=ms_rep, return_mode="median")


def anchors(rows: list[Row]):
    n = 1 << 28
    x = torch.randn(n // 2, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / ms / 1e9  # TB/s
    record(rows, Row("copy (device to device)", f"{x.numel() * 4 >> 20} MiB", ms, 2 * x.numel() * 4, "GB/s"))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = bench(lambda: a @ b)
    tflops = 2 * 8192 ** 3 / ms / 1e9
    record(rows, Row("matmul bf16", "8192^3", ms, 2 * 8192 ** 3, "TFLOP/s"))
    return bw, tflops   # TB/s, TFLOP/s


def lin_inputs(B, T, H, D, kind, grad=False):
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q, k = q * D ** -0.25, k * D ** -0.25
    g = gg = None
    if kind == "g_gamma":
        gg = -torch.rand(H, device="cuda") * 0.1 - 0.01
    elif kind == "g":
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda") + 4)
    elif kind == "gk":
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device="cuda") + 4) / 4
    return q, k, v, g, gg


def fwd_bwd(q, k, v, g, gg, do, need_dg):
    """Forward then backward as the autograd op runs them (the backward reuses the forward's states)."""
    o, _, saved = tc.forward(q, k, v, g, gg, return_saved=True)
    return tc.backward(q, k, v, g, gg, None, None, do, None, need_dg, kv_states=saved)


def linear(rows: list[Row], bw, tflops, shapes=((16, 4096), (1, 65536)), kinds=LINEAR_KINDS):
    H, D = 16, 128
    fla = peer_version("fla-core")
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        print("fla not importable:", e)
        chunk_gla = chunk_simple_gla = None
    for B, T in shapes:
        tok = B * T * H * D * 2                         # bytes of one [B,T,H,D] bf16 tensor
        floor_f = 4 * tok / bw / 1e9                    # read q,k,v write o
        floor_fb = 11 * tok / bw / 1e9                  # + read q,k,v,do, write dq,dk,dv
        shape = f"B={B} T={T} H={H} D={D}"
        for kind in kinds:
            q, k, v, g, gg = lin_inputs(B, T, H, D, kind)
            do = torch.randn_like(v)
            gb = 0 if g is None else g.numel() * 4 * (1 if kind != "gk" else 3)  # gate read (+ dg written)
            ms = bench(lambda: tc.forward(q, k, v, g, gg))
            record(rows, Row(f"ours linear {kind} fwd", shape, ms, (4 * tok + gb), "GB/s", floor_f))
            # g_gamma is a fixed buffer in the models (and fla gives it no gradient): no dg, as in fla
            ms = bench(lambda: fwd_bwd(q, k, v, g, gg, do, kind != "g_gamma"))
            record(rows, Row(f"ours linear {kind} fwd+bwd", shape, ms, (11 * tok + gb), "GB/s", floor_fb))
            if chunk_simple_gla is None:
                continue
            f = (lambda: chunk_gla(q, k, v, g)) if kind == "gk" else (lambda: chunk_simple_gla(q, k, v, g=g, g_gamma=gg))
            try:
                with torch.no_grad():
                    ms = bench(f)
                record(rows, Row(f"{fla} {kind} fwd", shape, ms, (4 * tok + gb), "GB/s", floor_f))
            except PEER_ERRORS as e:
                print(f"{fla} {kind} fwd failed: {type(e).__name__}: {str(e)[:120]}")
            try:
                qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
                gr = g.detach().requires_grad_() if g is not None else None
                fb = (lambda: chunk_gla(qr, kr, vr, gr)[0].backward(do)) if kind == "gk" else \
                    (lambda: chunk_simple_gla(qr, kr, vr, g=gr, g_gamma=gg)[0].backward(do))
                ms = bench(fb)
                record(rows, Row(f"{fla} {kind} fwd+bwd", shape, ms, (11 * tok + gb), "GB/s", floor_fb))
            except PEER_ERRORS as e:
                print(f"{fla} {kind} fwd+bwd failed: {type(e).__name__}: {str(e)[:160]}")
            del q, k, v, g, gg, do
            torch.cuda.empty_cache()


SP_SHAPES = ((1, 16384), (1, 65536), (4, 4096))   # one rank's local tokens
SP_DELAY_US = 100   # a stand-in collective's length: about a ZeCO scan of 1 MB states over 8 NVLink GPUs (estimate)


def sp_overhead(rows: list[Row], bw, kinds=("g_gamma", "g")):
    """One rank's local work (a 4-way split of 65,536 tokens: B=1, or 4 sequences of 16,384; and 1×65,536)
    against the plain kernel on the same local tokens, run by the SP operators' own code
    (parallel/linear/common.py) on one GPU, with a stand-in collective that returns P or R at once, or
    after SP_DELAY_US of GPU time on the comm stream (torch.cuda._sleep):
      forward, overlap=True: state pass -> [collective beside] zero-prefix output pass -> correction pass;
      forward, overlap=False: state pass -> [collective] -> output pass from P;
      backward: prefix_grad -> [reverse collective beside the dq kernel] -> the rest of the backward, or
        "serial": the backward waits for the collective before it starts.
    Timed eagerly and as CUDA-graph replays (the GPU's time alone: eager SP steps of this size are
    host-bound on the device's CPU). As in training, a backward follows each forward: per-key gates (gk)
    keep the forward's gate operands for it, in the plain kernel (as the autograd op runs it) and in SP."""
    from longscan.parallel.linear.common import (SPContext, local_backward, local_pass, prefix_grads,
                                                 reverse_beside_dq)
    H, D = 16, 128
    cycles = _sleep_cycles(rows, SP_DELAY_US)
    for B, T in SP_SHAPES:
        shape = f"B={B} T={T} H={H} D={D}"
        for kind in kinds:
            q, k, v, g, gg = lin_inputs(B, T, H, D, kind)
            if g is not None:
                g.requires_grad_()   # the gate's gradient is asked for, as in training
            do = torch.randn_like(v)
            P, R = torch.randn(1, B, H, D, D, device="cuda"), torch.randn(1, B, H, D, D, device="cuda")
            sps = {ov: SPContext(None, "contiguous", 0, 1, 1, D ** -0.5, tc.TritonBackend(), 4, ov)
                   for ov in (True, False)}
            keep = kind == "gk"   # the plain kernel as the autograd op runs it: the forward keeps its gate operands
            saved = tc.forward(q, k, v, g, gg, None, P[0], return_saved=True)[2] if keep else None

            def stand_in(result, delay):
                if delay:
                    torch.cuda._sleep(cycles)
                return result

            def timed(name, fn, plain, plain_gr, what):
                ms, gr = bench(fn), bench_graph(fn)
                record(rows, Row(f"ours SP local {what} {kind}, {name}", shape, ms,
                                 note=f"= {ms / plain:.2f}x plain; graph {gr:.3f} ms = {gr / plain_gr:.2f}x"))

            plain_fn = lambda: tc.forward(q, k, v, g, gg, None, P[0], return_saved=keep)  # noqa: E731
            plain, plain_gr = bench(plain_fn), bench_graph(plain_fn)
            record(rows, Row(f"ours plain fwd with h0 {kind}", shape, plain, note=f"graph {plain_gr:.3f} ms"))
            for delay in (0, SP_DELAY_US):
                for ov in (True, False):
                    timed(f"overlap={ov}, collective {delay} us",
                          lambda: local_pass(sps[ov], q, k, v, g, gg, lambda S, a: stand_in((P, None), delay), True),
                          plain, plain_gr, "fwd")
            plain_fn = lambda: tc.backward(q, k, v, g, gg, None, P[0], do, R[0], kind != "g_gamma",  # noqa: E731
                                           kv_states=saved)
            # the forward (the default schedule, from P) whose segment prefixes and gate operands it reuses
            record = local_pass(sps[False], q, k, v, g, gg, lambda S, a: (P, None), True)[2]
            plain, plain_gr = bench(plain_fn), bench_graph(plain_fn)
            record(rows, Row(f"ours plain bwd with h0, dht {kind}", shape, plain, note=f"graph {plain_gr:.3f} ms"))

            def sp_bwd(delay, beside):
                dP, logd, qdo = prefix_grads(sps[False], q, g, gg, do, record)
                late = reverse_beside_dq(q.device, lambda: stand_in(R, delay))
                return local_backward(sps[False], q, k, v, g, gg, P, do, late if beside else late(), qdo, record)
            for delay in (0, SP_DELAY_US):
                for beside in (True, False):
                    timed(f"{'beside dq' if beside else 'serial'}, collective {delay} us",
                          lambda: sp_bwd(delay, beside), plain, plain_gr, "bwd")


def _sleep_cycles(rows: list[Row], us: float) -> int:
    """GPU clock cycles of torch.cuda._sleep that take about ``us`` microseconds here (measured)."""
    n = 1 << 20
    ms = bench(lambda: torch.cuda._sleep(n), 20, 100)
    cycles = int(n * us / (ms * 1e3))
    record(rows, Row("torch.cuda._sleep stand-in collective", f"{cycles} cycles",
                     bench(lambda: torch.cuda._sleep(cycles), 20, 100)))
    return cycles


def flash(rows: list[Row], tflops):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, D = 4, 16, 128
    for T in (8192, 16384):
        shape = f"B={B} T={T} H={H} D={D}"
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        do = torch.randn_like(q)
        for causal in (True, False):
            fl = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
            tag = "causal" if causal else "full"
            ms = bench(lambda: tf.flash_attn_forward(q, k, v, None, causal))
            record(rows, Row(f"ours flash {tag} fwd", shape, ms, fl, "TFLOP/s", fl / tflops / 1e9))
            o, lse = tf.flash_attn_forward(q, k, v, None, causal)
            ms = bench(lambda: (tf.flash_attn_forward(q, k, v, None, causal),
                                tf.flash_attn_backward(do, q, k, v, o, lse, None, causal)))
            record(rows, Row(f"ours flash {tag} fwd+bwd", shape, ms, 3.5 * fl, "TFLOP/s", 3.5 * fl / tflops / 1e9))
            qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
            for name, be in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
                peer = f"torch {torch.__version__} {name}"
                try:
                    with sdpa_kernel([be]):
                        with torch.no_grad():
                            ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
                        record(rows, Row(f"{peer} {tag} fwd", shape, ms, fl, "TFLOP/s", fl / tflops / 1e9))
                        dot_ = do.transpose(1, 2)
                        ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                            qt, kt, vt, is_causal=causal).backward(dot_))
                        record(rows, Row(f"{peer} {tag} fwd+bwd", shape, ms, 3.5 * fl, "TFLOP/s",
                                         3.5 * fl / tflops / 1e9))
                except PEER_ERRORS as e:
                    print(f"{peer} failed: {type(e).__name__}: {str(e)[:120]}")


def check() -> bool:
    """Quick GPU correctness gate before timing: every decay kind, bf16, against torch_chunk in float64.
    Prints one line per case; True when every case is within tolerance."""
    from longscan.kernels.linear_attention import torch_chunk
    ok = True
    for D, (B, T, H) in ((128, (2, 777, 3)), (64, (1, 2100, 2))):
        for kind in ("none", "g_gamma", "g", "gk", "gk_steep"):
            q, k, v, g, gg = lin_inputs(B, T, H, D, {"none": "x", "gk_steep": "gk"}.get(kind, kind))
            if kind == "gk_steep":   # gates that fall far past exp's range inside a chunk (the levels)
                g = g.clone()
                g[..., 0], g[..., 1] = -7.0, -100.0
            h0 = torch.randn(B, H, D, D, device="cuda")
            do, dht = torch.randn_like(v), torch.randn_like(h0)
            o, ht = tc.forward(q, k, v, g, gg, None, h0, True)
            # the constant decay without its gradient: a fixed buffer, as in the models
            gr = tc.backward(q, k, v, g, gg, None, h0, do, dht, need_dg=kind != "g_gamma")
            dd = lambda x: None if x is None else x.double()  # noqa: E731
            ro, rh = torch_chunk.forward(dd(q), dd(k), dd(v), dd(g), dd(gg), None, dd(h0), True)
            rg = torch_chunk.backward(dd(q), dd(k), dd(v), dd(g), dd(gg), None, dd(h0), dd(do), dd(dht))
            errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip((o, ht) + gr, (ro, rh) + rg)
                    if a is not None and b is not None]
            ok &= max(errs) < 1e-2
            print(f"check linear D={D} {kind:8s} rel errs o,ht,dq,dk,dv,(dg),dh0:",
                  " ".join(f"{e:.1e}" for e in errs), "OK" if max(errs) < 1e-2 else "FAIL", flush=True)
    return ok


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/kernels_rows.md")
    ap.add_argument("--only", default="check,anchors,linear,sp,flash",
                    help=f"comma-separated subset of {','.join(PARTS)} (the ceilings are always measured)")
    ap.add_argument("--kinds", default=",".join(LINEAR_KINDS),
                    help="decay kinds of the linear rows (gk alone: the per-key rows, whose fla peer compiles slowly)")
    args = ap.parse_args(argv)
    args.parts = tuple(args.only.split(","))
    args.kinds = tuple(args.kinds.split(","))
    if not set(args.parts) <= set(PARTS):
        ap.error(f"--only: expected a comma-separated subset of {','.join(PARTS)}, got {args.only!r}")
    if not set(args.kinds) <= set(LINEAR_KINDS):
        ap.error(f"--kinds: expected a comma-separated subset of {','.join(LINEAR_KINDS)}, got "
                 f"{','.join(args.kinds)!r}")
    return args


def commit() -> str:
    """The checkout's commit; "-dirty" when the files differ from it (a copied tree: name it by hand)."""
    try:
        return subprocess.check_output(["git", "describe", "--always", "--dirty"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def header(device: str, bw: float, tflops: float) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Device: {device}; torch {torch.__version__}, triton {triton.__version__}, {peer_version('fla-core')}; "
            f"{date}; commit {commit()}. Measured ceilings: copy {bw:.2f} TB/s, bf16 matmul {tflops:.0f} TFLOP/s. "
            f"Median of do_bench.")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py times CUDA kernels: no CUDA device here")
    rows: list[Row] = []
    if "check" in args.parts and not check():
        raise SystemExit("the correctness gate failed (see the FAIL lines above): nothing timed")
    bw, tflops = anchors(rows)
    if "linear" in args.parts:
        linear(rows, bw, tflops, kinds=args.kinds)
    elif "linear_long" in args.parts:
        linear(rows, bw, tflops, shapes=((1, 65536),), kinds=args.kinds)
    if "sp" in args.parts:
        sp_overhead(rows, bw, kinds=args.kinds)
    if "flash" in args.parts:
        flash(rows, tflops)
    text = header(torch.cuda.get_device_name(), bw, tflops) + "\n\n" + markdown_table(TABLE_HEADER,
                                                                                      [r.cells() for r in rows])
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
