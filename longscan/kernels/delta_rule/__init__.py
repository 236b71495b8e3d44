"""The delta rule (DeltaNet, Gated DeltaNet, KDA) on one device.

    S_t = (I - β_t k_t k_tᵀ) D_t S_{t-1} + β_t k_t v_tᵀ,      o_t = scale · S_tᵀ q_t
D_t = I (g None: DeltaNet), exp(g_t)·I (g `[B, T, H]`: Gated DeltaNet), Diag(exp(g_t)) (g `[B, T, H, K]`: KDA).

Every backend provides
  forward(q, k, v, beta, g, scale, initial_state, output_final_state) -> (o, final_state | None)
  segment_transition(k, v, beta, g) -> (S_loc `[B, H, K, V]`, M `[B, H, K, K]`): S_out = M S_in + S_loc
both differentiable by autograd. Backends: "naive" (the recurrence), "torch" (chunked, WY representation;
the CPU default), "triton" (the same chunks in Triton kernels: the chunks' own quantities, the recurrence
across chunks, and their backward; the CUDA default; settings in DeltaTritonOptions, whose default
path="auto" runs the tensor-core kernels ("wy") for bf16 inputs and the float32 kernels for the others).
"""
from __future__ import annotations

import importlib
import types

import torch

from longscan.kernels.checks import check_linear_qkv
from longscan.kernels.delta_rule import torch_chunk
from longscan.kernels.delta_rule.naive import naive_recurrent_delta_rule
from longscan.kernels.linear_attention import check_log_decay

BACKENDS = ("auto", "naive", "torch", "triton")
TRITON_BACKEND = _TRITON = "longscan.kernels.delta_rule.triton_chunk"   # the Triton backend's module name
KERNEL_PATHS = ("float32", "wy")   # the Triton backend's kernel sets
TRITON_PATHS = ("auto",) + KERNEL_PATHS   # DeltaTritonOptions.path: "auto" picks a kernel set by the inputs' dtype


def _naive_segment_transition(k, v, beta, g=None):
    """(S_loc, M) by the recurrence: run it on [v | 0] from [0 | I] (see torch_chunk.segment_transition)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    v_aug = torch.cat([v, v.new_zeros(B, T, H, K)], dim=-1)
    h0 = torch.cat([k.new_zeros(B, H, K, V), torch.eye(K, dtype=k.dtype, device=k.device).expand(B, H, K, K)], -1)
    _, S = naive_recurrent_delta_rule(k, k, v_aug, beta, g, 1.0, h0, True)
    return S[..., :V], S[..., V:]


def _naive_forward(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False):
    o, S = naive_recurrent_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state)
    return o, (S.to(torch_chunk.compute_dtype(q)) if S is not None else None)


NAIVE = types.SimpleNamespace(__name__="naive", forward=_naive_forward, segment_transition=_naive_segment_transition)


def get_backend(name: str, device: torch.device):
    """The backend for ``name`` ("auto": triton on CUDA when importable, else torch)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} for the delta rule, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return torch_chunk
        try:
            return importlib.import_module(_TRITON)
        except ImportError:
            return torch_chunk
    if name == "triton":
        try:
            return importlib.import_module(_TRITON)
        except ImportError as e:
            raise ValueError(f"backend='triton' is not available here: {e}") from e
    return NAIVE if name == "naive" else torch_chunk


def check_inputs(q, k, v, beta, g=None, initial_state=None) -> None:
    """Raise ValueError/TypeError naming the parameter when shapes, dtypes, devices or ranges are wrong.

    β in (0, 1] and g ≤ 0 are checked on CPU tensors only: on CUDA the check would wait for the device."""
    B, T, H, K, V = check_linear_qkv(q, k, v)
    if not isinstance(beta, torch.Tensor) or not beta.is_floating_point():
        raise TypeError(f"beta must be a floating-point torch.Tensor [B, T, H], got {getattr(beta, 'dtype', beta)!r}")
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if beta.device != q.device:
        raise ValueError(f"beta must be on q's device ({q.device}), got {beta.device}")
    if g is not None:
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise TypeError(f"g must be a floating-point torch.Tensor, got {getattr(g, 'dtype', g)!r}")
        if tuple(g.shape) not in ((B, T, H), (B, T, H, K)):
            raise ValueError(f"g must be [B, T, H] = {(B, T, H)} or [B, T, H, K] = {(B, T, H, K)}, "
                             f"got {tuple(g.shape)}")
        if g.device != q.device:
            raise ValueError(f"g must be on q's device ({q.device}), got {g.device}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}, "
                             f"got {tuple(getattr(initial_state, 'shape', ()))}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on q's device ({q.device}), got {initial_state.device}")
    if q.device.type == "cpu":
        with torch.no_grad():
            if beta.numel() and not bool(((beta > 0) & (beta <= 1)).all()):
                raise ValueError(f"beta must lie in (0, 1], got values in [{beta.min().item():.4g}, "
                                 f"{beta.max().item():.4g}]")
            if g is not None and g.numel() and not bool((g <= 0).all()):
                raise ValueError(f"g (a log decay) must be <= 0, got a maximum of {g.max().item():.4g}")
    else:
        check_log_decay("g", g)   # on CUDA behind LONGSCAN_CHECKS=1 (it reads the values back)


def chunk_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                     backend="auto", options=None):
    """The delta rule on one device, with autograd (gradients of q, k, v, beta, g and initial_state).

    q, k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]` in (0, 1], g None, `[B, T, H]` or `[B, T, H, K]`
    (log decays ≤ 0), initial_state `[B, H, K, V]`. scale: K^-0.5 when None. backend: "auto" | "torch" |
    "naive" | "triton" (it refuses float64 inputs). options: a
    ``longscan.kernels.delta_rule.triton.DeltaTritonOptions`` for the Triton backend (None: its defaults, whose
    path="auto" runs path="wy" for bf16 k and path="float32" otherwise).
    -> (o `[B, T, H, V]` in q's dtype, final state `[B, H, K, V]` (float32; float64 for float64 inputs) or
    None). Same conventions as flash-linear-attention's chunk_delta_rule (β given, q and k not normalised
    here), chunk_gated_delta_rule and chunk_kda.
    """
    check_inputs(q, k, v, beta, g, initial_state)
    impl = get_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if options is None:
        return impl.forward(q, k, v, beta, g, scale, initial_state, output_final_state)
    if impl.__name__ != _TRITON:
        raise ValueError(f"options apply to the Triton backend only; backend={backend!r} runs "
                         f"{impl.__name__.rsplit('.', 1)[-1]} on {q.device.type}")
    return impl.forward(q, k, v, beta, g, scale, initial_state, output_final_state, options=options)


__all__ = ["chunk_delta_rule", "naive_recurrent_delta_rule", "check_inputs", "get_backend", "BACKENDS"]
