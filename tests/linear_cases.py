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
