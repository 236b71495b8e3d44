"""The delta rule's SP local overhead on one GPU: one rank's local stages beside the plain kernel.

    PYTHONPATH=. python benchmarks/sp_delta.py [--shapes 16x4096 1x65536] [--kinds deltanet gated_deltanet kda]
        [--paths float32 wy] [--layout contiguous zigzag] [--heads 16] [--head-dim 128] [--n-blocks 4] [--profile]

For every (kind, B x T local shape, path) it times forward+backward (median of triton.testing.do_bench) of
  plain:    chunk_delta_rule(q, k, v, beta, g) on the rank's T tokens (what one device does per token);
  stage 1:  the segment transitions (S_loc, M) of the rank's segments (one for contiguous, two for zigzag),
            backward from random gradients of both (what the collective's backward hands back);
  stage 3:  the output pass from a given carry P (initial_state, requires grad: the backward scan needs dP);
  SP local: stages 1 and 3 together (no collective: what a rank computes beyond communication);
  relay:    transition="relay"'s local work, the rank's segments run from a given entering state a block of
            ``--n-blocks`` V columns at a time, backward from random gradients of the output and the leaving
            state (``delta_rule_attention`` without a group: the chain without its hops),
and prints SP local / plain and relay / plain measured beside the ratios predicted by counting the products'
multiply-adds (``predicted_ratio``, ``relay_predicted_ratio``, counted for path="wy"'s products): stage 3 is
the plain kernel plus a state-sized load, so the matrix method's overhead is stage 1, a scan on [v | 0]
(V + K columns) from [0 | I] without outputs; the relay on path="wy" runs the plain kernel's products (zigzag's
copies of the two segments' inputs and outputs are not counted), on path="float32" the backend's forward and
backward once a block. bf16 q, k, v (k L2-normalised), float32 β and log gates, as ``benchmarks/delta_rule.py``.
--profile then lists the plain and relay steps' kernels (torch.profiler: calls and µs a step, largest first).
"""
from __future__ import annotations

import argparse

import torch

from bench_common import kernel_profile
from delta_rule import KINDS, inputs   # benchmarks/delta_rule.py: the same inputs
from longscan.kernels.delta_rule import chunk_delta_rule, triton_chunk
from longscan.kernels.delta_rule.triton import DeltaTritonOptions
from longscan.parallel.delta_rule import delta_rule_attention
from longscan.parallel.linear.common import split

PATHS = ("float32", "wy")


def _products(kind: str, K: int, v: int, has_q: bool, C: int = 64) -> tuple[int, int]:
    """(multiply-adds that scale with the value columns v, those that do not) of path="wy"'s forward and
    backward on a chunk of C tokens (``predicted_ratio`` lists the products)."""
    fwd_v = C * C * v + 2 * C * K * v
    fwd_0 = 2 * C * C * K
    bwd_v = 2 * C * K * v + 2 * C * K * v + 2 * C * C * v
    bwd_0 = 5 * C * C * K
    if has_q:
        fwd_v += C * K * v + C * C * v
        fwd_0 += C * C * K
        bwd_v += C * C * v + C * K * v + C * K * v + C * C * v
        bwd_0 += C * C * K + 2 * C * C * K
        bwd_0 += C * C * K if kind == "gated_deltanet" else 0
    return fwd_v + bwd_v, fwd_0 + bwd_0


def predicted_ratio(kind: str, K: int, V: int, C: int = 64) -> float:
    """(plain + segment transition) / plain in multiply-adds a chunk of C tokens, path="wy"'s products:
    forward A = KKᵀ, W = PX, U = PY, the state pass (WS, K̄ᵀv_n), the output (QKᵀ, QS, (QKᵀ)v_n); backward
    dv_local (QKᵀ, its product with do), the serial pass (K̄dS, Q̃ᵀdo, Wᵀdv), ``_wy_dqkw`` (do v_nᵀ, do Sᵀ,
    dv_n Sᵀ, v_n dSᵀ, dF K, dFᵀ Q, and QKᵀ again for a scalar gate), ``_wy_bwd`` (PᵀdU, dY Uᵀ, PᵀdW twice,
    dX Wᵀ, KKᵀ, (M + Mᵀ)K). The transition runs the same at V' = V + K value columns without q: no output,
    no dv_local, none of do's products. The triangular inverse and elementwise work are left out."""
    plain = sum(_products(kind, K, V, True, C))
    return (plain + sum(_products(kind, K, V + K, False, C))) / plain


def relay_predicted_ratio(kind: str, K: int, V: int, n_blocks: int, prepared_once: bool, C: int = 64) -> float:
    """transition="relay"'s local work / plain, counted as ``predicted_ratio``: the same products as the plain
    kernel when the k/β/g work runs once a segment (path="wy"'s stages), else the products that do not scale
    with V repeated for every block (the backend's forward and backward once a block, path="float32")."""
    with_v, without_v = _products(kind, K, V, True, C)
    return (with_v + (1 if prepared_once else n_blocks) * without_v) / (with_v + without_v)


def plain_step(x, options):
    def step():
        o, _ = chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], backend="triton", options=options)
        return [o]
    return step


def stage1_step(x, n, options):
    def step():
        ks, vs, bs, gs = (split(x[name], n) for name in ("k", "v", "beta", "g"))
        return list(triton_chunk.segment_transition(ks, vs, bs, gs, options=options))
    return step


def stage3_step(x, n, P, options):
    def step():
        qs, ks, vs, bs, gs = (split(x[name], n) for name in ("q", "k", "v", "beta", "g"))
        o, _ = triton_chunk.forward(qs, ks, vs, bs, gs, initial_state=P, options=options)
        return [o]
    return step


def relay_step(x, layout, P, options, n_blocks):
    def step():
        o, s = delta_rule_attention(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=P,
                                    output_final_state=True, layout=layout, backend="triton", n_blocks=n_blocks,
                                    options=options, transition="relay")
        return [o, s]
    return step


def timed(steps, grads, leaves):
    """fwd+bwd ms of running every step in ``steps`` and backpropagating ``grads`` (one list per step)."""
    from triton.testing import do_bench

    def run():
        outs, gos = [], []
        for step, g in zip(steps, grads):
            o = step()
            outs += o
            gos += g
        torch.autograd.backward(outs, gos)
    return do_bench(run, warmup=25, rep=100, grad_to_none=leaves)


def print_profile(name: str, step, grads, leaves, top: int = 14) -> None:
    """The kernels of one forward+backward of ``step``, µs a step (the leaves' gradients cleared each step)."""
    def run():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(step(), grads)
    rows = kernel_profile(run, 3)
    print(f"   {name}: {sum(us for _, _, us in rows):,.0f} µs of kernels a step")
    for kernel, calls, us in rows[:top]:
        print(f"   {us:10.1f} µs  x{calls:<3} {kernel[:90]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["16x4096", "1x65536"], help="B x T local (tokens a rank)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--layout", nargs="+", default=["contiguous"], choices=["contiguous", "zigzag"],
                   help="zigzag: the rank's two segments (each T/2) through the same stages")
    p.add_argument("--n-blocks", type=int, default=4, help="the relay's blocks of V columns")
    p.add_argument("--profile", action="store_true", help="list the plain and relay steps' kernels")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/sp_delta.py times the Triton kernels on a GPU; no CUDA device here")
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(f"{'kind':16} {'B x T':>10} {'layout':>10} {'path':>8} {'plain':>9} {'stage 1':>9} {'stage 3':>9} "
          f"{'SP local':>9} {'ratio':>7} {'predicted':>10} {'relay':>9} {'ratio':>7} {'predicted':>10}   (fwd+bwd ms)")
    H, D = a.heads, a.head_dim
    for kind in a.kinds:
        for shape in a.shapes:
            B, T = (int(s) for s in shape.split("x"))
            x = inputs(kind, B, T, H, D, dev)
            leaves = [t for t in x.values() if t is not None]
            gen = torch.Generator(device=dev).manual_seed(1)
            do = torch.randn(B, T, H, D, device=dev, generator=gen, dtype=torch.bfloat16)
            for layout in a.layout:
                n = 2 if layout == "zigzag" else 1
                if T % n:
                    raise SystemExit(f"--layout zigzag needs an even T, got {T}")
                P = (0.1 * torch.randn(B * n, H, D, D, device=dev, generator=gen)).requires_grad_()
                P0 = (0.1 * torch.randn(B, H, D, D, device=dev, generator=gen)).requires_grad_()
                dS = torch.randn(B, H, D, D, device=dev, generator=gen)
                dloc = torch.randn(B * n, H, D, D, device=dev, generator=gen)
                dM = torch.randn(B * n, H, D, D, device=dev, generator=gen)
                for path in a.paths:
                    options = DeltaTritonOptions(path=path)
                    plain = timed([plain_step(x, options)], [[do]], leaves)
                    s1 = stage1_step(x, n, options)
                    s3 = stage3_step(x, n, P, options)
                    t1 = timed([s1], [[dloc, dM]], leaves)
                    t3 = timed([s3], [[split(do, n)]], leaves + [P])
                    both = timed([s1, s3], [[dloc, dM], [split(do, n)]], leaves + [P])
                    relay = timed([relay_step(x, layout, P0, options, a.n_blocks)], [[do, dS]], leaves + [P0])
                    relay_pred = relay_predicted_ratio(kind, D, D, a.n_blocks, prepared_once=path == "wy")
                    print(f"{kind:16} {shape:>10} {layout:>10} {path:>8} {plain:9.3f} {t1:9.3f} {t3:9.3f} "
                          f"{both:9.3f} {both / plain:7.2f} {predicted_ratio(kind, D, D):10.2f} "
                          f"{relay:9.3f} {relay / plain:7.2f} {relay_pred:10.2f}")
                    if a.profile:
                        print_profile("plain", plain_step(x, options), [do], leaves)
                        print_profile("relay", relay_step(x, layout, P0, options, a.n_blocks), [do, dS], leaves + [P0])
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
