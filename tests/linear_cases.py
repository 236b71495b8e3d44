"""Random inputs for the linear-attention tests: every decay kind, gates neither ~0 nor ~1."""
from __future__ import annotations

import torch

DECAYS = ("none", "g_gamma", "g_scalar", "g_per_key")


def make_inputs(decay: str, B: int, T: int, H: int, K: int, V: int, dtype, seed: int) -> dict:
    """q, k, v, g, g_gamma, initial_state as a dict of fresh random tensors (log decays in [-0.6, -0.05])."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    def gate(*shape):  # exp(gate) in about [0.55, 0.95]
        return (-0.05 - 0.55 * torch.rand(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    x = dict(q=rand(B, T, H, K), k=rand(B, T, H, K), v=rand(B, T, H, V), g=None, g_gamma=None,
             initial_state=rand(B, H, K, V))
    if decay == "g_gamma":
        x["g_gamma"] = gate(H)
    elif decay == "g_scalar":
        x["g"] = gate(B, T, H)
    elif decay == "g_per_key":
        x["g"] = gate(B, T, H, K)
    elif decay != "none":
        raise ValueError(decay)
    return x


def each_document_alone(leaves, h0, cu, do, dfinal, use_h0, want_final):
    """The float64 recurrence on every packed document alone, from its own initial state ``h0[i]`` where use_h0
    -> (o, final states `[N, H, K, V]`, the gradients of leaves and initial_state); the loss takes the final states
    where want_final."""
    from longscan.kernels.linear_attention import naive_recurrent_linear_attention
    lv = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    if use_h0:
        lv["initial_state"] = h0.clone().requires_grad_()
    g, g_gamma = lv.get("g"), lv.get("g_gamma")
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        o, s = naive_recurrent_linear_attention(lv["q"][:, a:b], lv["k"][:, a:b], lv["v"][:, a:b],
                                                g[:, a:b] if g is not None else None, g_gamma,
                                                initial_state=lv["initial_state"][i:i + 1] if use_h0 else None,
                                                output_final_state=True)
        outs.append(o)
        finals.append(s)
    o, finals = torch.cat(outs, 1), torch.cat(finals, 0)
    loss = (o * do).sum() + ((finals * dfinal).sum() if want_final else 0)
    names = list(lv)
    return o, finals, dict(zip(names, torch.autograd.grad(loss, [lv[n] for n in names])))


def random_offsets(T: int, seed: int) -> list[int]:
    """cu_seqlens of documents of 1 to 6 tokens over T tokens, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    cu = [0]
    while cu[-1] < T:
        cu.append(min(T, cu[-1] + int(torch.randint(1, 7, (1,), generator=gen))))
    return cu


def triton_device_or_skip() -> str:
    """The device the Triton kernels run on here ("cuda", or "cpu" under TRITON_INTERPRET=1); skips otherwise."""
    import os

    import pytest
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"
