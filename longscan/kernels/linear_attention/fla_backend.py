"""flash-linear-attention (fla-core) behind the local-compute contract, for side-by-side checks.

forward/backward call fla's chunk_simple_gla (no decay, g_gamma `[H]`, g `[B, T, H]`) or chunk_gla
(g `[B, T, H, K]`); gradients come from fla's own backward through torch.autograd. fla returns no gradient
for g_gamma, so the backward passes a constant-decay model as g = g_gamma broadcast to `[B, T, H]` and sums.
The SP pieces are torch_chunk's (fla has no equivalent). Note: fla refuses its gated backward on
Triton < 3.7.1 on Hopper (a Triton miscompile); that error is passed through unchanged.
"""
from __future__ import annotations

try:
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("backend 'fla' needs flash-linear-attention: pip install fla-core (or longscan[fla])") from e

import torch

from longscan.kernels.linear_attention.backend import TorchBackend, resolve_dht


def _call(q, k, v, g, g_gamma, scale, h0, output_final_state):
    if g is not None and g.dim() == 4:
        return chunk_gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=output_final_state)
    return chunk_simple_gla(q, k, v, g=g, g_gamma=g_gamma, scale=scale, initial_state=h0,
                            output_final_state=output_final_state)


def forward(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False):
    """-> (o `[B, T, H, V]` in q's dtype, final state `[B, H, K, V]` float32 or None)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    h0 = initial_state.float() if initial_state is not None else None
    with torch.no_grad():
        o, ht = _call(q, k, v, g, g_gamma, scale, h0, output_final_state)
    return o, (ht.float() if output_final_state else None)


def backward(q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True):
    """-> (dq, dk, dv, dg, dh0); dh0 float32 `[B, H, K, V]` also without initial_state."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    h0 = (initial_state.float() if initial_state is not None
          else q.new_zeros(B, H, K, V, dtype=torch.float32)).detach().requires_grad_()
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    gate = None
    if g is not None:
        gate = g.detach().requires_grad_(need_dg)
        gl = gate
    elif g_gamma is not None:
        gate = g_gamma.detach().requires_grad_(need_dg)
        gl = gate.float().view(1, 1, H).expand(B, T, H).contiguous()
    else:
        gl = None
    with torch.enable_grad():
        o, ht = _call(*leaves, gl, None, scale, h0, dht is not None)
        outs, grads = [o], [do.to(o.dtype)]
        if dht is not None:
            outs.append(ht)
            grads.append(dht.to(ht.dtype))
        inputs = leaves + [h0] + ([gate] if gate is not None and need_dg else [])
        res = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
    dq, dk, dv, dh0 = (torch.zeros_like(x) if r is None else r for r, x in zip(res[:4], leaves + [h0]))
    dg = None
    if gate is not None and need_dg:
        dg = (res[4] if res[4] is not None else torch.zeros_like(gate)).to(gate.dtype)
    return dq, dk, dv, dg, dh0.float()


class FlaBackend(TorchBackend):
    """fla's chunk kernels for forward and backward; the SP pieces are the torch backend's."""
    name = "fla"

    def forward(self, q, k, v, g, g_gamma, scale, initial_state, output_final_state, *, keep=False, saved=None):
        return forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state) + (None,)

    def backward(self, q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True, *, saved=None, qdo=None):
        return backward(q, k, v, g, g_gamma, scale, initial_state, do, resolve_dht(dht), need_dg)


__all__ = ["forward", "backward", "FlaBackend"]
