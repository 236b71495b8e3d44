"""Where the bf16 dq of the Triton linear-attention kernels loses accuracy: an emulation on the CPU, in float64 with
each of the kernels' bf16 (and tf32) roundings made explicitly, one switch a rounding, beside fla-core's rounding
pattern (chunk_gla, as its source reads) and the bar "the computation in float32 from the same bf16 inputs,
rounded once". Turning one rounding off at a time attributes the error; the fixes are rows of the same table.

Each case draws fresh random inputs (as benchmarks/accuracy_linear.py does: q, k, v, do ~ N(0, 1), log gates in
[-0.6, -0.05], an initial state N(0, 1) with --states), rounds q, k, v and do to bf16 (the inputs every bf16
backend sees; do is the gradient of a bf16 output), and measures ||dq - ref|| / ||ref||, ref the float64 dq of
the unrounded inputs. The table gives, per variant, the median error and the median and worst ratio to the
peer's error on the same inputs (per-key gates: fla's pattern; constant decay: the rounded-once bar).
float32 arithmetic is taken as exact (its 2^-24 is far below bf16's 2^-9); the per-key emulation covers gates
that stay above -LEVEL_SPAN inside a chunk (no steep levels).

    PYTHONPATH=. python benchmarks/tuning/dq_rounding.py [--lengths 1 63 64 65 1000] [--dims 64 128] [--seeds 4]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics

import torch

LEVEL_SPAN = 60.0
C = 64


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to tf32 (10 explicit mantissa bits, to nearest even), as a tensor core takes float32 operands."""
    i = x.float().view(torch.int32)
    i = (i + 0xFFF + ((i >> 13) & 1)) & ~0x1FFF
    return i.view(torch.float32).double()


def split(x: torch.Tensor) -> torch.Tensor:
    """x as two bf16 halves hi + lo (what two tensor-core dots see)."""
    hi = bf16(x)
    return hi + bf16(x - hi)


def keep(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclasses.dataclass(frozen=True)
class Inputs:
    q: torch.Tensor       # [T, K]
    k: torch.Tensor
    v: torch.Tensor       # [T, V]
    do: torch.Tensor
    g: torch.Tensor       # [T, K] log gates (per key), or [T] (scalar kinds)
    h0: torch.Tensor | None

    @property
    def scale(self) -> float:
        return self.q.shape[1] ** -0.5

    def rounded(self) -> Inputs:
        """q, k, v and do in bf16 (the gates and the state stay as they are: float32 tensors)."""
        return dataclasses.replace(self, q=bf16(self.q), k=bf16(self.k), v=bf16(self.v), do=bf16(self.do))


def draw(T: int, K: int, V: int, states: bool, per_key: bool, seed: int, gamma: bool = False) -> Inputs:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def gate(*shape):
        return -0.05 - 0.55 * torch.rand(*shape, generator=gen, dtype=torch.float64)

    g = gate(T, K) if per_key else (gate(1).expand(T).clone() if gamma else gate(T))
    return Inputs(rand(T, K), rand(T, K), rand(T, V), rand(T, V), g, rand(K, V) if states else None)


def exact_dq(x: Inputs) -> torch.Tensor:
    """dq_t = scale·S_t do_t, S_t = exp(g_t)⊙S_{t−1} + k_t v_tᵀ (per key: the decay on S's rows), in float64."""
    T, K = x.q.shape
    S = x.h0.clone() if x.h0 is not None else torch.zeros(K, x.v.shape[1], dtype=torch.float64)
    dq = torch.empty(T, K, dtype=torch.float64)
    for t in range(T):
        decay = torch.exp(x.g[t])
        S = (decay[:, None] if x.g.dim() == 2 else decay) * S + torch.outer(x.k[t], x.v[t])
        dq[t] = x.scale * (S @ x.do[t])
    return dq


def chunks(T: int, c: int):
    for t0 in range(0, T, c):
        yield t0, min(t0 + c, T)


@dataclasses.dataclass(frozen=True)
class PerKey:
    """The per-key (GATE 3) dq kernel's roundings (True: rounded as the kernel does). Pre-pass: eq = exp(b) and
    kd = k⊙exp(b_C − b) stored in bf16; the dq kernel: level 0's keys kn = kd⊙e0 with the scale e0 = exp(−b_C)
    rounded to bf16 and the product to bf16, the causal scores dA = do vᵀ rounded to bf16 for the intra dot,
    the state in the inter dot (tf32 with the gate gradient; bf16 without), dq stored in bf16."""
    dA: bool = True
    e0: bool = True
    kn: bool = True
    eq: bool = True
    kd: bool = True
    state: str = "tf32"          # "tf32", "split" (two bf16 halves), "bf16" or "exact"
    out: bool = True
    dA_split: bool = False       # dA as two bf16 halves (two dots)
    dA_tf32: bool = False        # dA in float32 into a tf32 dot (kd, bf16, is exact in tf32)

    def dq(self, x: Inputs) -> torch.Tensor:
        T, K = x.q.shape
        r = lambda on, t: bf16(t) if on else t   # noqa: E731
        S = x.h0.clone() if x.h0 is not None else torch.zeros(K, x.v.shape[1], dtype=torch.float64)
        out = torch.empty(T, K, dtype=torch.float64)
        rs = {"tf32": tf32, "split": split, "bf16": bf16, "exact": keep}[self.state]
        for t0, t1 in chunks(T, C):
            b = torch.cumsum(x.g[t0:t1], 0)
            bC = b[-1]
            eq = r(self.eq, torch.exp(b))
            kd = r(self.kd, x.k[t0:t1] * torch.exp(bC - b))
            e0 = r(self.e0, torch.exp(torch.clamp(-bC, max=LEVEL_SPAN)))
            kn = r(self.kn, kd * e0)
            dA = torch.tril(x.do[t0:t1] @ x.v[t0:t1].T)
            dA = split(dA) if self.dA_split else tf32(dA) if self.dA_tf32 else r(self.dA, dA)
            inter = x.do[t0:t1] @ rs(S).T
            acc = (inter + dA @ kn) * eq
            out[t0:t1] = r(self.out, x.scale * acc)
            S = torch.exp(bC)[:, None] * S + kd.T @ x.v[t0:t1]
        return out


def fla_gla_dq(x: Inputs) -> torch.Tensor:
    """fla-core's chunk_gla dq as its source reads (fla/ops/gla/chunk.py, fla/ops/common/chunk_h.py): chunks of
    min(64, max(16, next_pow2(T))) tokens in sub-chunks of 16; dA = scale·do vᵀ kept in float32; the intra part
    across sub-chunks a float32 (tf32) dot of dA with k⊙exp(g_n − g) (g_n the sub-chunk's first cumulative gate)
    times exp(g − g_n), inside a sub-chunk exact float32 sums; the inter part do·bf16(h) times exp(g), h the
    float32 state built from bf16(k⊙exp(g_last − g)); dq rounded to bf16 once."""
    T, K = x.q.shape
    BT = min(64, max(16, 1 << (T - 1).bit_length()))
    BC = 16
    h = x.h0.clone() if x.h0 is not None else torch.zeros(K, x.v.shape[1], dtype=torch.float64)
    out = torch.empty(T, K, dtype=torch.float64)
    for t0, t1 in chunks(T, BT):
        gc = torch.cumsum(x.g[t0:t1], 0)
        do, v, k = x.do[t0:t1], x.v[t0:t1], x.k[t0:t1]
        dA = x.scale * (do @ v.T)
        dq = x.scale * (do @ bf16(h).T) * torch.exp(gc)
        for i0, i1 in chunks(t1 - t0, BC):
            if i0 > 0:
                gn = gc[i0]
                kg = tf32(k[:i0] * torch.exp(gn - gc[:i0]))
                dq[i0:i1] += (tf32(dA[i0:i1, :i0]) @ kg) * torch.exp(gc[i0:i1] - gn)
            for j in range(i0, i1):
                dq[j:i1] += dA[j:i1, j, None] * k[j] * torch.exp(gc[j:i1] - gc[j])
        out[t0:t1] = bf16(dq)
        h = torch.exp(gc[-1])[:, None] * h + bf16(k * torch.exp(gc[-1] - gc)).T @ v
    return out


@dataclasses.dataclass(frozen=True)
class Scalar:
    """The scalar-decay dq kernel (GATE 1, the constant decay, and GATE 2, the data-dependent scalar gate) on bf16
    inputs: the decayed causal scores dA = (do vᵀ)⊙exp(b_t − b_s) rounded to bf16 for the intra dot (or two bf16
    halves, dA_split), the state in the inter dot (bf16 without the gate gradient; "split": two bf16 halves,
    the scalar gate's dq with it; "exact"), the state's keys k⊙exp(b_C − b) in bf16, dq stored in bf16."""
    dA: bool = True
    state: str = "bf16"
    kd: bool = True
    out: bool = True
    dA_split: bool = False

    def dq(self, x: Inputs) -> torch.Tensor:
        T, K = x.q.shape
        r = lambda on, t: bf16(t) if on else t   # noqa: E731
        rs = {"split": split, "bf16": bf16, "exact": keep}[self.state]
        S = x.h0.clone() if x.h0 is not None else torch.zeros(K, x.v.shape[1], dtype=torch.float64)
        out = torch.empty(T, K, dtype=torch.float64)
        for t0, t1 in chunks(T, C):
            b = torch.cumsum(x.g[t0:t1], 0)
            dA = torch.tril((x.do[t0:t1] @ x.v[t0:t1].T) * torch.exp(b[:, None] - b[None, :]))
            dA = split(dA) if self.dA_split else r(self.dA, dA)
            acc = (x.do[t0:t1] @ rs(S).T) * torch.exp(b)[:, None] + dA @ x.k[t0:t1]
            out[t0:t1] = r(self.out, x.scale * acc)
            S = torch.exp(b[-1]) * S + r(self.kd, x.k[t0:t1] * torch.exp(b[-1] - b)[:, None]).T @ x.v[t0:t1]
        return out


def bar_dq(x: Inputs) -> torch.Tensor:
    """The bar of the gated kinds fla refuses: the exact dq of the bf16 inputs, rounded once to bf16."""
    return bf16(exact_dq(x))


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm()).item()


# Per-key variants: the kernel before level 0's keys went to float32, each rounding off alone, then the kernels as
# they are (kn never formed: dot(dA, kd)·e0 in float32), with dq_factor_f32 (eq in float32), and with the scores
# split as well (LinearKernelOptions.with_per_key_dq_split(): also the state products as two bf16 halves).
PER_KEY = {
    "bf16 kn (before)": PerKey(),
    "  without dA's rounding": PerKey(dA=False),
    "  without e0's rounding": PerKey(e0=False),
    "  without kn's rounding": PerKey(kn=False),
    "  without eq's rounding": PerKey(eq=False),
    "  without kd's rounding": PerKey(kd=False),
    "  with an exact state (inter)": PerKey(state="exact"),
    "  without the output's rounding": PerKey(out=False),
    "kn in float32 (the kernels, default)": PerKey(e0=False, kn=False),
    "  + dq_factor_f32 (eq in float32)": PerKey(e0=False, kn=False, eq=False),
    "  + scores split (with_per_key_dq_split())": PerKey(e0=False, kn=False, dA_split=True, state="split"),
    "  + dq_factor_f32 + scores split": PerKey(e0=False, kn=False, eq=False, dA_split=True, state="split"),
    "  + scores in tf32": PerKey(e0=False, kn=False, dA_tf32=True),
    "  + dq_factor_f32 + scores in tf32": PerKey(e0=False, kn=False, eq=False, dA_tf32=True),
    "  + scores in tf32, state split": PerKey(e0=False, kn=False, dA_tf32=True, state="split"),
    "no gate gradient (bf16 state), bf16 kn (before)": PerKey(state="bf16"),
    "no gate gradient (bf16 state), kn in float32": PerKey(state="bf16", e0=False, kn=False),
}
# Scalar kinds: without the gate gradient (the constant decay's bf16 kernels; the scalar gate's without dg) the
# scores are split with dq_scores_split (on by default); with it (the scalar gate's dq: the state split) they are not.
SCALAR = {
    "no gate gradient, scores rounded once (before)": Scalar(),
    "  without dA's rounding": Scalar(dA=False),
    "  without kd's rounding": Scalar(kd=False),
    "  with an exact state (inter)": Scalar(state="exact"),
    "  without the output's rounding": Scalar(out=False),
    "no gate gradient, scores split (dq_scores_split)": Scalar(dA_split=True),
    "  + state split (not shipped)": Scalar(dA_split=True, state="split"),
    "scalar gate with the gate gradient (state split)": Scalar(state="split"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    K: int
    states: bool
    seed: int


def measure(kind: str, cases: list[Case]) -> dict:
    """{variant: [(error, peer error)]} over the cases; kind "gk" (peer: fla's pattern), "g_gamma" or "g" (peer:
    the rounded-once bar), and for the scalar kinds the bar without do's rounding too (benchmarks/accuracy_linear.py
    had it so)."""
    res = {}
    for c in cases:
        raw = draw(c.T, c.K, c.K, c.states, kind == "gk", c.seed, gamma=kind == "g_gamma")
        x = raw.rounded()
        ref = exact_dq(raw)
        if kind == "gk":
            peer = rel(fla_gla_dq(x), ref)
            variants = PER_KEY
        else:
            peer = rel(bar_dq(x), ref)
            res.setdefault("bar with do unrounded (the old script's)", []).append(
                (rel(bf16(exact_dq(dataclasses.replace(x, do=raw.do))), ref), peer))
            res.setdefault("float32 kernels (learnable g_gamma's path)", []).append((rel(bar_dq(x), ref), peer))
            res.setdefault("  the same against the old script's bar", []).append(
                (rel(bar_dq(x), ref), rel(bf16(exact_dq(dataclasses.replace(x, do=raw.do))), ref)))
            variants = SCALAR
        if kind == "gk":
            res.setdefault("fla-core chunk_gla pattern", []).append((peer, peer))
        for name, v in variants.items():
            res.setdefault(name, []).append((rel(v.dq(x), ref), peer))
    return res


def table(kind: str, res: dict) -> str:
    peer = "fla" if kind == "gk" else "bar"
    lines = [f"| {kind}: variant | median error | median / {peer} | worst / {peer} |", "|---|---|---|---|"]
    for name, vals in res.items():
        ratios = [a / b for a, b in vals]
        lines.append(f"| {name} | {statistics.median(a for a, _ in vals):.2e} | {statistics.median(ratios):.2f} | "
                     f"{max(ratios):.2f} |")
    return "\n".join(lines)


def summary(kind: str, res: dict, names) -> dict:
    """{variant: (median ratio, worst ratio)} of the named variants."""
    return {n: (statistics.median(a / b for a, b in res[n]), max(a / b for a, b in res[n])) for n in names}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[1, 63, 64, 65, 1000])
    p.add_argument("--dims", nargs="+", type=int, default=[64, 128], help="head dims K = V")
    p.add_argument("--seeds", type=int, default=4, help="fresh inputs per (T, K, states)")
    p.add_argument("--kinds", nargs="+", default=["gk", "g_gamma", "g"], choices=["gk", "g_gamma", "g"])
    p.add_argument("--by-length", action="store_true", help="also a table per length")
    a = p.parse_args(argv)
    for kind in a.kinds:
        cases = [Case(T, K, s, 1000 * i + j) for i, (T, K, s) in enumerate(itertools.product(a.lengths, a.dims,
                                                                                             (False, True)))
                 for j in range(a.seeds)]
        print(f"\n{kind}: T {a.lengths}, K = V {a.dims}, with and without an initial state, {a.seeds} seeds each "
              f"({len(cases)} cases)\n")
        print(table(kind, measure(kind, cases)))
        if a.by_length:
            for T in a.lengths:
                print(f"\n{kind}, T = {T}\n")
                print(table(kind, measure(kind, [c for c in cases if c.T == T])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
