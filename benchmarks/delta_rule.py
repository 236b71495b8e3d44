"""The delta rule on one GPU: forward and forward+backward of longscan's backends beside
flash-linear-attention's chunk_delta_rule / chunk_gated_delta_rule / chunk_kda (when installed), and beside
longscan's scalar-gate linear attention at the same shape (the yardstick: same q, k, v, no delta rule).

    PYTHONPATH=. python benchmarks/delta_rule.py [--shapes 16x4096 1x65536] [--backends triton triton-torch-intra]
        [--precision ieee tf32] [--recompute] [--chunk 32] [--kinds deltanet gated_deltanet kda]
        [--settings default inter_stages_1 inter_block_k_32 inter_block_k_32_v16 inverse_blocks
                    intra_stages_3 block_k_32 wy auto wy_state_v16 wy_state_v32 wy_state_v64 wy_state_v64_w4
                    wy_forward_v32 wy_state_v32_w8 wy_inverse_w8 wy_bwd_from_inputs
                    wy_gate_rows_stages_2
                    wy_no_gate_rows wy_regs_free wy_no_gate_rows_regs_free]

Backends: "triton" (every stage in Triton), "triton-torch-intra" (the chunks' own quantities in batched torch,
the recurrence across chunks in Triton: the earlier path), "torch". bf16 q, k, v (k L2-normalised), float32 β
in (0, 1) and log gates, 16 heads × 128 by default. Prints one row per (kind, shape, implementation):
milliseconds (median of triton.testing.do_bench), and for the other delta-rule rows the relative L2 difference
of their output and final state, and the largest of their gradients' (q, k, v, β, g), from the first row's on
the same inputs. --settings adds rows of the "triton" backend at other options than the defaults (SETTINGS),
so a setting not yet measured runs beside the default. The "triton" rows run path="float32" (the kernels for
float32 inputs; "auto", the options' default, runs "wy" for these bf16 inputs) unless their setting names
"wy" or "auto".
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from longscan.kernels.delta_rule import chunk_delta_rule
from longscan.kernels.delta_rule.triton import DeltaTritonOptions
from longscan.kernels.linear_attention import chunk_linear_attention

KINDS = ("deltanet", "gated_deltanet", "kda")
BACKENDS = ("triton", "triton-torch-intra", "torch")
# named DeltaTritonOptions overrides for the "triton" backend's rows
SETTINGS = {
    "default": {},                                  # path="float32" at its defaults
    "inter_stages_1": dict(inter_num_stages=1),     # the recurrence without its next-chunk prefetch (fewer spills)
    "inverse_blocks": dict(inverse="blocks"),       # P from two half-blocks: half the sequential steps
    "intra_stages_3": dict(intra_num_stages=3),     # the intra kernels pipelined (they spill at K = 128)
    "inter_block_k_32": dict(inter_block_k=32),     # the recurrence's state in blocks of 32 keys (fewer spills)
    "inter_block_k_32_v16": dict(inter_block_k=32, block_v=16),   # and 16 V columns a program
    "block_k_32": dict(block_k=32),                 # the intra kernels' key blocks halved in number
    "wy": dict(path="wy"),                          # tensor-core products on bf16, chunks of 64 (every kind)
    "auto": dict(path="auto"),                      # the options' default: wy on these bf16 inputs
    # its serial kernels at 16, 32 or 64 V columns a program whatever the launch (the default chooses per launch;
    # 4 warps below 64 columns, 8 at 64 unless named)
    "wy_state_v16": dict(path="wy", wy_state_block_v=16),
    "wy_state_v32": dict(path="wy", wy_state_block_v=32),
    "wy_state_v64": dict(path="wy", wy_state_block_v=64),
    "wy_state_v64_w4": dict(path="wy", wy_state_block_v=64, wy_state_num_warps=4),
    # the forward's parallel kernels (W/U, the output) at block_v's 32 V columns a program (the default: 64)
    "wy_forward_v32": dict(path="wy", wy_forward_block_v=32),
    "wy_state_v32_w8": dict(path="wy", wy_state_block_v=32, wy_state_num_warps=8),   # the same at 8 warps
    "wy_inverse_w8": dict(path="wy", wy_inverse_num_warps=8),   # the inverse at 8 warps (4 spill on Triton 3.6)
    # the WY backward's dA from v and k instead of U and W (no gate, a scalar gate)
    "wy_bwd_from_inputs": dict(path="wy", wy_bwd_from_inputs=True),
    # the defaults scale a scalar gate's serial-backward rows (wy_gate_rows) and cap the parallel backward at 128
    # registers (wy_max_registers); these rows run without one or both, and the rows variant at 2 programs an SM
    "wy_gate_rows_stages_2": dict(path="wy", inter_num_stages=2),
    "wy_no_gate_rows": dict(path="wy", wy_gate_rows=False),
    "wy_regs_free": dict(path="wy", wy_max_registers=None),
    "wy_no_gate_rows_regs_free": dict(path="wy", wy_gate_rows=False, wy_max_registers=None),
}


def ours(backend, chunk, precision, recompute=False, setting="default"):
    """longscan's chunk_delta_rule on ``backend`` as f(q, k, v, beta, g) -> (o, final state)."""
    if backend == "torch":
        return lambda q, k, v, beta, g: chunk_delta_rule(q, k, v, beta, g, output_final_state=True, backend="torch")
    kw = dict(path="float32", chunk=chunk, intra="torch" if backend == "triton-torch-intra" else "triton",
              input_precision=precision, recompute=recompute) | SETTINGS[setting]
    if kw["path"] == "wy":   # it reads none of the float32 path's chunk, intra and recompute
        kw = {n: v for n, v in kw.items() if n not in ("chunk", "intra", "recompute")}
    options = DeltaTritonOptions(**kw)
    return lambda q, k, v, beta, g: chunk_delta_rule(q, k, v, beta, g, output_final_state=True, backend="triton",
                                                     options=options)


def linear_yardstick(q, k, v, beta, g):
    """Scalar-gate linear attention on the same q, k, v (β unused; a gate [B, T, H] made for it)."""
    gs = g if g is not None and g.dim() == 3 else torch.full(q.shape[:3], -1 / 16, device=q.device)
    return chunk_linear_attention(q, k, v, g=gs, output_final_state=True, backend="triton")


def inputs(kind, B, T, H, D, device):
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device)
    q, k, v = rand(B, T, H, D), F.normalize(rand(B, T, H, D), dim=-1), rand(B, T, H, D)
    beta = torch.sigmoid(rand(B, T, H))
    g = None
    if kind == "gated_deltanet":
        g = F.logsigmoid(rand(B, T, H)) / 16
    elif kind == "kda":
        g = F.logsigmoid(rand(B, T, H, D)) / 16
    bf = lambda x: x.to(torch.bfloat16).requires_grad_()  # noqa: E731
    return dict(q=bf(q), k=bf(k), v=bf(v), beta=beta.requires_grad_(), g=g.requires_grad_() if g is not None else None)


def peer(kind):
    """fla's function for ``kind`` as f(q, k, v, beta, g) -> (o, final state), or None when not importable."""
    try:
        if kind == "deltanet":
            from fla.ops.delta_rule import chunk_delta_rule as f
            return lambda q, k, v, beta, g: f(q, k, v, beta.to(q.dtype), output_final_state=True)
        if kind == "gated_deltanet":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as f
            return lambda q, k, v, beta, g: f(q, k, v, g, beta.to(q.dtype), output_final_state=True)
        from fla.ops.kda import chunk_kda as f
        return lambda q, k, v, beta, g: f(q, k, v, g, beta.to(q.dtype), output_final_state=True)
    except ImportError as e:
        print(f"fla for {kind} not importable: {e}")
        return None


def gradients(f, x, do):
    """The gradients of every input that has one, from o·do (the rows' gradients are compared to the first's)."""
    leaves = [t for t in x.values() if t is not None]
    o, _ = f(**x)
    return torch.autograd.grad(o, leaves, do)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main():
    from triton.testing import do_bench
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["16x4096", "1x65536"], help="BxT")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=["triton", "triton-torch-intra"], choices=BACKENDS)
    p.add_argument("--chunk", type=int, default=DeltaTritonOptions().chunk, help="tokens a chunk (Triton)")
    p.add_argument("--precision", nargs="+", default=["ieee"], choices=["ieee", "tf32"],
                   help="the Triton kernels' dots (one row per value)")
    p.add_argument("--recompute", action="store_true",
                   help="the Triton backend keeps only the inputs and runs its forward stages again in the backward")
    p.add_argument("--settings", nargs="+",
                   default=["default", "inter_stages_1", "inter_block_k_32", "inter_block_k_32_v16", "inverse_blocks",
                            "wy", "wy_state_v32", "wy_state_v32_w8"],
                   choices=list(SETTINGS), help="rows of the triton backend at these options (one row per value)")
    p.add_argument("--no-linear", action="store_true", help="skip the scalar-gate linear attention row")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    a = p.parse_args()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(f"{'kind':16} {'B x T':>10} {'implementation':40} {'fwd ms':>9} {'fwd+bwd ms':>11} "
          f"{'rel diff o / state':>20} {'max grad diff':>14}")
    for kind in a.kinds:
        for shape in a.shapes:
            B, T = (int(x) for x in shape.split("x"))
            x = inputs(kind, B, T, a.heads, a.head_dim, dev)
            do = torch.randn_like(x["v"])
            first = {}
            impls = [(f"longscan {b}" + (f" {p}" if b != "torch" and len(a.precision) > 1 else "")
                      + (f" {st}" if st != "default" else ""), ours(b, a.chunk, p, a.recompute, st))
                     for b in a.backends for p in (a.precision if b != "torch" else ["ieee"])
                     for st in (a.settings if b == "triton" else ["default"])
                     if not (a.recompute and SETTINGS[st].get("path") in ("wy", "auto"))]   # wy never recomputes
            fla = peer(kind)
            if fla is not None:
                impls.append(("fla", fla))
            if not a.no_linear:
                impls.append(("linear attention (g)", linear_yardstick))
            for name, f in impls:
                try:
                    with torch.no_grad():
                        o, s = f(**x)
                    fwd = do_bench(lambda: f(**x), warmup=25, rep=100)

                    def step():
                        o, _ = f(**x)
                        o.backward(do)
                    both = do_bench(step, warmup=25, rep=100, grad_to_none=[t for t in x.values() if t is not None])
                    diff = gdiff = ""
                    if f is not linear_yardstick:
                        grads = gradients(f, x, do)
                        if not first:
                            first = {"o": o, "s": s, "grads": grads}
                        else:
                            diff = f"{rel(o, first['o']):.1e} / {rel(s, first['s']):.1e}"
                            gdiff = f"{max(rel(a, b) for a, b in zip(grads, first['grads'])):.1e}"
                    print(f"{kind:16} {shape:>10} {name:40} {fwd:9.3f} {both:11.3f} {diff:>20} {gdiff:>14}")
                except Exception as e:   # a peer may refuse a shape: report it and go on
                    print(f"{kind:16} {shape:>10} {name:40} failed: {type(e).__name__}: {str(e)[:100]}")
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
