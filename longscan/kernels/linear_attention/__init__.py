"""Linear attention on one device, behind one contract (DESIGN.md, "Local compute contract").

Every backend module provides:
  forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state) -> (o, final_state | None)
  backward(q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True) -> (dq, dk, dv, dg, dh0)
      (need_dg=False: the gate needs no gradient; dg is None and its cost is skipped)
  optionally, with REUSES_SEGMENT_STATES = True (Triton), what one pass computed is handed to the next:
      segment_state/prefix_grad/forward(..., return_saved=True) add their per-segment states (or None) to
      what they return; forward(..., kv_states=) and backward(..., kv_states=, qdo_states=) take them. The
      forward's hold the states entering its segments, its initial_state included: they are for a backward
      with the same initial_state only (not for another forward); segment_state(..., return_saved=True,
      keep_prefixes=True) also keeps the segment prefixes from zero, for a forward without initial_state;
      the forward's may also hold per-key gates' decayed operands (KEEP_GATE_OPERANDS), for its backward
  optionally, with LATE_DHT = True (Triton), backward(..., dht=function) calls the function for dht only after
      launching the work that needs no dht (the dq kernel), so SP's reverse collective runs beside it
  segment_state(k, v, g, g_gamma) -> (S_loc [B,H,K,V] f32, log_decay [B,H,K] f32)
  add_prefix(o, q, g, g_gamma, scale, P) -> o + scale·(q⊙exp(A))ᵀP
  prefix_grad(q, g, g_gamma, scale, do) -> scale·Σ_t (q_t⊙exp(A_t)) do_tᵀ   [B,H,K,V] f32
Backends: "naive" (recurrent reference), "torch" (chunked, CPU default), "triton" (GPU default),
"fla" (flash-linear-attention, when installed, for side-by-side checks).
"""
from __future__ import annotations

import importlib
import types

import torch

from longscan.kernels import saved
from longscan.kernels.checks import check_4d_float, check_like_q
from longscan.kernels.linear_attention import naive, torch_chunk
from longscan.kernels.linear_attention.naive import naive_recurrent_linear_attention

BACKENDS = ("auto", "naive", "torch", "triton", "fla")
_MODULES = {"torch": "longscan.kernels.linear_attention.torch_chunk",
            "triton": "longscan.kernels.linear_attention.triton_chunk",
            "fla": "longscan.kernels.linear_attention.fla_backend"}


def _naive_forward(q, k, v, g, g_gamma, scale, h0):
    return naive_recurrent_linear_attention(q, k, v, g, g_gamma, scale, h0, output_final_state=True)


def _naive_backend() -> types.SimpleNamespace:
    """The recurrent reference behind the contract; gradients by autograd, SP pieces from torch_chunk."""
    def forward(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False):
        o, S = _naive_forward(q, k, v, g, g_gamma, scale, initial_state)
        return o, (S.to(torch_chunk.compute_dtype(q)) if output_final_state else None)

    def backward(q, k, v, g, g_gamma, scale, initial_state, do, dht, need_dg=True):
        return torch_chunk.autograd_backward(_naive_forward, q, k, v, g, g_gamma, scale, initial_state, do, dht,
                                             need_dg)

    return types.SimpleNamespace(forward=forward, backward=backward, segment_state=torch_chunk.segment_state,
                                 add_prefix=torch_chunk.add_prefix, prefix_grad=torch_chunk.prefix_grad)


def get_backend(name: str, device: torch.device):
    """The backend module for ``name`` ("auto": triton on CUDA when importable, else torch)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            try:
                return importlib.import_module(_MODULES["triton"])
            except ImportError:
                pass
    if name == "naive":
        return _naive_backend()
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:
        raise ValueError(f"backend={name!r} is not available here: {e}") from e


def check_backend_supports(impl, g_gamma) -> None:
    """Refuse what a backend would compute wrongly rather than return it."""
    if g_gamma is not None and g_gamma.requires_grad and not getattr(impl, "SUPPORTS_G_GAMMA_GRAD", True):
        raise ValueError(f"g_gamma requires grad, but backend {impl.__name__.rsplit('.', 1)[-1]!r} does not give "
                         "an accurate g_gamma gradient; keep g_gamma fixed (detach it) or use backend='torch'")


def check_inputs(q, k, v, g=None, g_gamma=None, initial_state=None) -> None:
    """Raise ValueError/TypeError naming the parameter when shapes, dtypes or devices disagree."""
    check_4d_float(dict(q=q, k=k, v=v), dict(q="[B, T, H, K]", k="[B, T, H, K]", v="[B, T, H, V]"))
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H of q {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    check_like_q(q, dict(k=k, v=v))
    B, T, H, K = q.shape
    V = v.shape[-1]
    if g is not None and g_gamma is not None:
        raise ValueError("pass at most one of g and g_gamma (got both)")
    if g is not None:
        if g.shape not in ((B, T, H), (B, T, H, K)):
            raise ValueError(f"g must be [B, T, H] = {(B, T, H)} or [B, T, H, K] = {(B, T, H, K)}, got {tuple(g.shape)}")
        if not g.is_floating_point() or g.device != q.device:
            raise TypeError(f"g must be a floating-point tensor on {q.device}, got {g.dtype} on {g.device}")
    if g_gamma is not None:
        if tuple(g_gamma.shape) != (H,):
            raise ValueError(f"g_gamma must be [H] = ({H},), got {tuple(g_gamma.shape)}")
        if g_gamma.device != q.device:
            raise ValueError(f"g_gamma must be on q's device ({q.device}), got {g_gamma.device}")
    if initial_state is not None:
        if tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}, got {tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on q's device ({q.device}), got {initial_state.device}")


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, g_gamma, initial_state, scale, output_final_state, impl):
        # what a backend's forward hands its backward (Triton: the segment prefixes, h0 included, and the
        # per-key gate operands), only when a backward will come; as saved tensors, so that activation
        # checkpointing frees them too (longscan.kernels.saved)
        reuse = None
        if getattr(impl, "REUSES_SEGMENT_STATES", False) and any(ctx.needs_input_grad):
            o, ht, reuse = impl.forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                                        return_saved=True)
        else:
            o, ht = impl.forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state)
        kept, ctx.reuse = saved.pack(reuse)
        ctx.save_for_backward(q, k, v, g, g_gamma, initial_state, *kept)
        ctx.scale, ctx.impl = scale, impl
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, g_gamma, h0, *kept = ctx.saved_tensors
        need_dg = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        reuse = saved.unpack(kept, ctx.reuse)
        extra = {"kv_states": reuse} if reuse is not None else {}
        dq, dk, dv, dgate, dh0 = ctx.impl.backward(q, k, v, g, g_gamma, ctx.scale, h0, do, dht, need_dg, **extra)
        dg = dgate if g is not None else None
        dgg = dgate if g_gamma is not None else None
        return dq, dk, dv, dg, dgg, (dh0.to(h0.dtype) if h0 is not None else None), None, None, None


def chunk_linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                           output_final_state=False, backend="auto"):
    """Linear attention with optional diagonal decay on one device, with autograd.

    q, k `[B, T, H, K]`; v `[B, T, H, V]`; g `[B, T, H]` or `[B, T, H, K]` or g_gamma `[H]` (log decays);
    initial_state `[B, H, K, V]`. Returns (o `[B, T, H, V]`, final state `[B, H, K, V]` float32 or None).
    Same conventions as flash-linear-attention's chunk_simple_gla / chunk_gla.
    """
    check_inputs(q, k, v, g, g_gamma, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = get_backend(backend, q.device)
    check_backend_supports(impl, g_gamma)
    return _ChunkLinearAttention.apply(q, k, v, g, g_gamma, initial_state, scale, output_final_state, impl)


__all__ = ["chunk_linear_attention", "naive_recurrent_linear_attention", "get_backend", "check_inputs",
           "check_backend_supports",
           "BACKENDS"]
