"""Sweep the launch settings of the Triton flash-attention backward on one GPU.

bf16, B=4, H=16, D=128, causal and full:
  1. peers: torch SDPA flash and cuDNN, and ours with the current settings, fwd and fwd+bwd at T=8192, 16384;
  2. the dk/dv kernel's blocks × warps × pipeline stages (dq at its setting), then the dq kernel's (dk/dv at
     the best found); only the backward (`flash_attn_backward` given o, lse) is timed, at T=8192. Each
     setting is first checked against float32 math on a small shape (T not a multiple of any block); a
     wrong one prints FAIL and is not timed, one that does not compile (shared memory) is skipped;
  3. the picked pair against the current settings at both lengths.
Backward FLOPs = 2.5 × forward (4·B·H·T²·D, halved for causal). Prints one line per setting, the best per
kernel and the dict to paste into ``triton_flash.BWD_CONFIG`` by hand (the sweep changes no file; the
module's settings are restored on exit).

    PYTHONPATH=. python benchmarks/tuning/tune_flash.py [--skip-peers] [--sweep-lengths 8192]
"""
from __future__ import annotations

import argparse
import contextlib
import math

import torch
import triton

from longscan.kernels.softmax_attention import triton_flash as tf

B, H, D = 4, 16, 128
LENGTHS = (8192, 16384)
# (BM, BN, num_warps, num_stages): 20 per kernel. dk/dv: a large kv block (BN) streams q blocks (BM) past it;
# dq the other way round.
DKDV_GRID = ([(32, 128, w, s) for w in (4, 8) for s in (2, 3, 4, 5)]
             + [(64, 128, 8, 2), (64, 128, 8, 3), (64, 128, 4, 2)]
             + [(64, 64, w, s) for w in (4, 8) for s in (2, 3)] + [(32, 64, 4, s) for s in (2, 3, 4)]
             + [(16, 128, 4, 3), (16, 128, 8, 3)])
DQ_GRID = ([(128, 32, w, s) for w in (4, 8) for s in (2, 3, 4, 5)]
           + [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2)]
           + [(64, 64, w, s) for w in (4, 8) for s in (2, 3)] + [(64, 32, 4, s) for s in (2, 3, 4)]
           + [(128, 16, 4, 3), (128, 16, 8, 3)])
TOL = 2e-2      # bf16 against float32 math lands near 5e-3; a wrong block is off by O(1)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_flops(T, causal):
    return 4 * B * H * T * T * D * (0.5 if causal else 1.0)


def tflops(flops, ms):
    return flops / ms / 1e9


def inputs(b, T, Tk, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(b, Tk, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    return q, k, v, torch.randn_like(q)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@contextlib.contextmanager
def setting(kernel, bm, bn, warps, stages):
    """Use these settings for one kernel inside the block, whatever happens in it."""
    old = tf.BWD_CONFIG[kernel]
    tf.BWD_CONFIG[kernel] = dict(BM=bm, BN=bn, num_warps=warps, num_stages=stages)
    try:
        yield
    finally:
        tf.BWD_CONFIG[kernel] = old


def reference_grads(q, k, v, do, causal):
    """dq, dk, dv by autograd over float32 softmax math ([B, T, H, D] layout)."""
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    s = torch.einsum("bthd,bshd->bhts", qf, kf) * D ** -0.5
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device="cuda").tril(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), vf)
    return torch.autograd.grad(o, (qf, kf, vf), do.float())


# small check shapes: lengths divisible by 16 (so the kernels compile once for check and timing) but by no
# block; the full mask with Tq != Tk
CHECKS = {True: (1040, 1040), False: (1040, 784)}
_refs = {}


def check():
    """Worst relative error of dq, dk, dv over causal and full with the current settings."""
    worst = 0.0
    for causal, (T, Tk) in CHECKS.items():
        if causal not in _refs:
            x = inputs(1, T, Tk, seed=T + Tk)
            _refs[causal] = (x, reference_grads(*x, causal))
        (q, k, v, do), want = _refs[causal]
        o, lse = tf.flash_attn_forward(q, k, v, None, causal)
        got = tf.flash_attn_backward(do, q, k, v, o, lse, None, causal)
        errs = [rel_err(g, w) for g, w in zip(got, want)]
        worst = max(worst, *(e if math.isfinite(e) else math.inf for e in errs))
    return worst


def time_bwd(data, lengths):
    """Backward ms per (T, causal) case."""
    out = {}
    for T in lengths:
        q, k, v, do = data[T]
        for causal in (True, False):
            o, lse = tf.flash_attn_forward(q, k, v, None, causal)
            out[T, causal] = bench(lambda: tf.flash_attn_backward(do, q, k, v, o, lse, None, causal))
    return out


def fmt(ms):
    return "  ".join(f"T={T} {'causal' if c else 'full'} {m:.2f} ms {tflops(2.5 * fwd_flops(T, c), m):.0f}"
                     for (T, c), m in ms.items())


def peers(data):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for T in LENGTHS:
        q, k, v, do = data[T]
        for causal in (True, False):
            fl = fwd_flops(T, causal)
            tag = f"T={T} {'causal' if causal else 'full':6s}"
            f = bench(lambda: tf.flash_attn_forward(q, k, v, None, causal))
            o, lse = tf.flash_attn_forward(q, k, v, None, causal)
            b = bench(lambda: tf.flash_attn_backward(do, q, k, v, o, lse, None, causal))
            fb = bench(lambda: (tf.flash_attn_forward(q, k, v, None, causal),
                                tf.flash_attn_backward(do, q, k, v, o, lse, None, causal)))
            print(f"{tag} ours        fwd {tflops(fl, f):4.0f}  bwd {tflops(2.5 * fl, b):4.0f}  "
                  f"fwd+bwd {tflops(3.5 * fl, fb):4.0f} TFLOP/s ({fb:.2f} ms)", flush=True)
            qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
            dot_ = do.transpose(1, 2)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            for name, be in (("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel([be]):
                        with torch.no_grad():
                            f = bench(lambda: sdpa(qt, kt, vt, is_causal=causal))
                        fb = bench(lambda: sdpa(qt, kt, vt, is_causal=causal).backward(dot_))
                    print(f"{tag} {name}  fwd {tflops(fl, f):4.0f}  bwd≈{tflops(2.5 * fl, fb - f):4.0f}  "
                          f"fwd+bwd {tflops(3.5 * fl, fb):4.0f} TFLOP/s ({fb:.2f} ms)", flush=True)
                except Exception as e:  # noqa: BLE001 - a backend missing on this build is reported, not fatal
                    print(f"{tag} {name} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            qt.grad = kt.grad = vt.grad = None


def sweep(kernel, grid, data, lengths):
    """Check and time every setting of one kernel; -> the best (BM, BN, warps, stages) or None."""
    results = []
    for cfg in grid:
        name = f"{kernel} BM={cfg[0]:3d} BN={cfg[1]:3d} warps={cfg[2]} stages={cfg[3]}"
        with setting(kernel, *cfg):
            try:
                err = check()
                if not err <= TOL:
                    print(f"{name}: FAIL rel err {err:.2e}", flush=True)
                    continue
                ms = time_bwd(data, lengths)
            except Exception as e:  # noqa: BLE001 - a setting that does not compile (shared memory) is skipped
                msg = str(e).strip().splitlines()
                print(f"{name}: skipped, {type(e).__name__}: {msg[-1][:120] if msg else ''}", flush=True)
                continue
        results.append((sum(ms.values()), cfg))
        print(f"{name}: err {err:.1e}  {fmt(ms)}", flush=True)
    if not results:
        print(f"BEST {kernel}: none ran", flush=True)
        return None
    total, best = min(results)
    print(f"BEST {kernel}: BM={best[0]} BN={best[1]} warps={best[2]} stages={best[3]} (sum {total:.2f} ms)",
          flush=True)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--sweep-lengths", nargs="+", type=int, default=[8192])
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}", flush=True)
    lengths = sorted(set(LENGTHS) | set(args.sweep_lengths))
    data = {T: inputs(B, T, T, seed=T) for T in lengths}
    base = {n: dict(c) for n, c in tf.BWD_CONFIG.items()}
    print(f"current BWD_CONFIG = {base}", flush=True)
    try:
        err = check()
        print(f"current settings: err {err:.1e}{'' if err <= TOL else '  FAIL'}", flush=True)
        if not args.skip_peers:
            peers({T: data[T] for T in LENGTHS})
        now = time_bwd(data, LENGTHS)
        print(f"current bwd: {fmt(now)}", flush=True)
        picked = {}
        for kernel, grid in (("dkdv", DKDV_GRID), ("dq", DQ_GRID)):
            best = sweep(kernel, grid, data, args.sweep_lengths)
            if best is not None:        # the next kernel's sweep runs with this one at its best
                picked[kernel] = dict(BM=best[0], BN=best[1], num_warps=best[2], num_stages=best[3])
                tf.BWD_CONFIG[kernel] = picked[kernel]
        new = time_bwd(data, LENGTHS)
        print(f"picked bwd:  {fmt(new)}", flush=True)
        for key in now:
            print(f"  T={key[0]} {'causal' if key[1] else 'full'}: {now[key]:.2f} -> {new[key]:.2f} ms "
                  f"({now[key] / new[key]:.2f}x)", flush=True)
        print(f"BWD_CONFIG = {{\n    \"dkdv\": {tf.BWD_CONFIG['dkdv']},\n    \"dq\": {tf.BWD_CONFIG['dq']},\n}}",
              flush=True)
    finally:
        tf.BWD_CONFIG.clear()
        tf.BWD_CONFIG.update(base)


if __name__ == "__main__":
    main()
