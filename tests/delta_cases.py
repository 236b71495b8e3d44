"""Random inputs for the delta-rule tests: the three kinds, unit-norm keys, β and gates neither ~0 nor ~1."""
from __future__ import annotations

import torch

KINDS = ("deltanet", "gated", "kda")    # D_t = I, exp(g_t)·I with g [B, T, H], Diag(exp(g_t)) with g [B, T, H, K]


def make_inputs(kind: str, B: int, T: int, H: int, K: int, V: int, dtype, seed: int) -> dict:
    """q, k, v, beta, g, initial_state as a dict of fresh random tensors (k L2-normalised, as the models
    make it: then every I - β k kᵀ is a contraction; β in [0.2, 0.9]; log decays in [-0.6, -0.05])."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    k = rand(B, T, H, K)
    x = dict(q=rand(B, T, H, K), k=k / k.norm(dim=-1, keepdim=True), v=rand(B, T, H, V),
             beta=uniform(0.2, 0.9, B, T, H), g=None, initial_state=rand(B, H, K, V))
    if kind == "gated":
        x["g"] = uniform(-0.6, -0.05, B, T, H)
    elif kind == "kda":
        x["g"] = uniform(-0.6, -0.05, B, T, H, K)
    elif kind != "deltanet":
        raise ValueError(kind)
    return {n: (t.to(dtype) if t is not None else None) for n, t in x.items()}


NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def run_with_grads(fn, x: dict, do, dht):
    """fn(**x) -> (o, final state, {name: gradient}) for the inputs that are not None, the output's gradient do
    and (when fn gives a state) the state's dht."""
    leaves = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o, s = fn(**leaves)
    wanted = [n for n in NAMES if leaves[n] is not None]
    outs, gos = [o], [do]
    if s is not None:
        outs.append(s)
        gos.append(dht)
    return o, s, dict(zip(wanted, torch.autograd.grad(outs, [leaves[n] for n in wanted], gos)))
