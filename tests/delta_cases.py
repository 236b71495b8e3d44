"""Random inputs for the delta-rule tests: the three kinds, unit-norm keys, β and gates neither ~0 nor ~1."""
from __future__ import annotations

import torch

from harness import rel_err
from longscan.kernels.delta_rule import naive_recurrent_delta_rule

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


def float32_on(x: dict, device) -> dict:
    """float32 copies of the inputs on device (None stays None)."""
    return {n: (t.float().to(device) if t is not None else None) for n, t in x.items()}


def compare_with_recurrence(forward, kind: str, shape: tuple, with_state: bool, seed: int, device, tol: float,
                            zero_atol: float | None = None) -> None:
    """forward(**inputs, output_final_state=with_state) in float32 on device against the float64 recurrence:
    the output, the final state (with_state; else no initial state either) and every input's gradient from
    random gradients of both, each within tol. zero_atol: a gradient that is exactly zero in float64 (dg of one
    token from no state) only needs to stay below it (float32 round-off), not a relative error."""
    B, T, H, K, V = shape
    x = make_inputs(kind, B, T, H, K, V, torch.float64, seed=seed)
    if not with_state:
        x["initial_state"] = None
    gen = torch.Generator().manual_seed(seed + 100)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    ref = run_with_grads(lambda **a: naive_recurrent_delta_rule(**a, output_final_state=with_state), x, do, dht)
    got = run_with_grads(lambda **a: forward(**a, output_final_state=with_state), float32_on(x, device),
                         do.float().to(device), dht.float().to(device))
    err = rel_err(got[0].cpu(), ref[0])
    assert err < tol, ("o", err)
    assert (got[1] is None) == (ref[1] is None)
    if with_state:
        err = rel_err(got[1].cpu(), ref[1])
        assert err < tol, ("final_state", err)
    assert set(got[2]) == set(ref[2]), (set(got[2]), set(ref[2]))
    for n in ref[2]:
        if zero_atol is not None and ref[2][n].abs().max() == 0:
            assert got[2][n].abs().max() < zero_atol, n
        else:
            assert rel_err(got[2][n].cpu(), ref[2][n]) < tol, n


def compare_final_state_gradients(forward, kind: str, T: int, device) -> None:
    """A loss on the final state alone (o unused: its gradient reaches the kernels as None or zeros): the
    gradients of every input but q from forward(**inputs, output_final_state=True) in float32 on device against
    the float64 recurrence's (B = 1, H = 2, K = V = 16, T tokens)."""
    x = make_inputs(kind, 1, T, 2, 16, 16, torch.float64, seed=17)
    dht = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    names = [n for n in NAMES if n != "q" and x[n] is not None]

    def grads(fn, x, dht):
        leaves = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
        _, s = fn(**leaves)
        return torch.autograd.grad(s, [leaves[n] for n in names], dht)
    ref = grads(lambda **a: naive_recurrent_delta_rule(**a, output_final_state=True), x, dht)
    got = grads(lambda **a: forward(**a, output_final_state=True), float32_on(x, device), dht.float().to(device))
    for n, a, b in zip(names, got, ref):
        assert rel_err(a.cpu(), b) < 1e-5, n
