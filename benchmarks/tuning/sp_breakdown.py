"""Where one SP rank's time goes: each piece of the linear SP step timed alone on one GPU.

    python benchmarks/tuning/sp_breakdown.py [--length 16384] [--decay g_gamma]

Pieces (contract functions of the default backend) against the plain forward+backward they add to.
"""
from __future__ import annotations

import argparse

import torch
import triton.testing

from longscan.kernels.linear_attention import get_backend


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decay", choices=["g_gamma", "g_scalar"], default="g_gamma")
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    B, T, H, D = 1, args.length, args.heads, args.head_dim
    q, k, v, do = (torch.randn(B, T, H, D, device=dev, dtype=dt) for _ in range(4))
    g_gamma = -torch.linspace(0.01, 0.1, H, device=dev) if args.decay == "g_gamma" else None
    g = -0.1 * torch.rand(B, T, H, device=dev) if args.decay == "g_scalar" else None
    P = torch.randn(B, H, D, D, device=dev)
    impl = get_backend("auto", dev)
    o, _, _ = impl.forward(q, k, v, g, g_gamma, 0.1, None, False)
    pieces = {
        "forward (no state)": lambda: impl.forward(q, k, v, g, g_gamma, 0.1, None, False),
        "forward (h0, final state)": lambda: impl.forward(q, k, v, g, g_gamma, 0.1, P, True),
        "backward (no h0, no dht)": lambda: impl.backward(q, k, v, g, g_gamma, 0.1, None, do, None),
        "backward (h0, dht)": lambda: impl.backward(q, k, v, g, g_gamma, 0.1, P, do, P),
        "segment_state": lambda: impl.segment_state(k, v, g, g_gamma),
        "add_prefix": lambda: impl.add_prefix(o, q, g, g_gamma, 0.1, P),
        "prefix_grad": lambda: impl.prefix_grad(q, g, g_gamma, 0.1, do),
    }
    print(f"# {torch.cuda.get_device_name()}  bf16  B={B} T={T} H={H} D={D}  decay={args.decay}  backend={impl.name}")
    for name, fn in pieces.items():
        print(f"{name:<28}{triton.testing.do_bench(fn, warmup=10, rep=50):>9.3f} ms")


if __name__ == "__main__":
    main()
