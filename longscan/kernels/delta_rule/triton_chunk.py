"""The delta rule's Triton backend (float32 and bf16 inputs; float16 runs the float32 kernels by default).

Chunks of ``DeltaTritonOptions.chunk`` tokens. Inside a chunk, the WY / UT representation (one unit
lower-triangular inverse a chunk, W, U_0, tril(Q̃K̂ᵀ), Q̃, K̄, the chunk's total log gate, see
``torch_chunk``) runs in a Triton kernel, and so does its backward; across chunks a Triton kernel carries
the state forward and its gradient backward (``triton/``). ``options.intra="torch"`` takes the chunks'
quantities from batched torch under autograd instead (the earlier path, kept for comparison);
``options.path="wy"`` runs the tensor-core kernels (chunks of 64, bf16 products for bf16 inputs), for the
forward and for the segment transitions alike; the default ``path="auto"`` runs them for bf16 k and the
float32 kernels otherwise (``DeltaTritonOptions.resolved``, applied here before any kernel).
"""
from __future__ import annotations

import dataclasses

import torch

from longscan.kernels.delta_rule.triton import DeltaTritonOptions, scan
from longscan.kernels.delta_rule.triton.inter import _inter_bwd, _inter_fwd, pow2 as _pow2  # noqa: F401

_DEFAULT = DeltaTritonOptions()
CHUNK = _DEFAULT.chunk          # the defaults, by name (the kernels' compile checks read them)
BLOCK_V = _DEFAULT.block_v
NUM_WARPS = _DEFAULT.num_warps


def _options(options, chunk, dtype: torch.dtype) -> DeltaTritonOptions:
    """The options that run for k of ``dtype`` (path="auto" resolved, before any kernel); chunk, when given,
    overrides options.chunk first."""
    options = _DEFAULT if options is None else options
    if not isinstance(options, DeltaTritonOptions):
        raise TypeError(f"options must be a DeltaTritonOptions, got {type(options).__name__}")
    if chunk is not None:
        options = dataclasses.replace(options, chunk=chunk)
    return options.resolved(dtype)


def forward(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, chunk=None,
            options: DeltaTritonOptions | None = None):
    """-> (o `[B, T, H, V]` in q's dtype, final state `[B, H, K, V]` float32 or None). Differentiable.
    chunk, when given, overrides options.chunk. options None: ``DeltaTritonOptions()`` (path="auto")."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, S = scan(q=q, k=k, v=v, beta=beta, g=g, h0=initial_state, scale=scale, options=_options(options, chunk, k.dtype))
    return o.to(q.dtype), (S if output_final_state else None)


def segment_transition(k, v, beta, g=None, chunk=None, options: DeltaTritonOptions | None = None):
    """(S_loc `[B, H, K, V]`, M `[B, H, K, K]`) float32: S_out = M S_in + S_loc (see torch_chunk), the scan
    without outputs on [v | 0] from [0 | I]. [v | 0] is float32 on path="float32" and in k's dtype on
    path="wy" (its products' operands); the identity enters as the float32 initial state either way."""
    options = _options(options, chunk, k.dtype)
    B, T, H, K = k.shape
    V = v.shape[-1]
    dtype = k.dtype if options.path == "wy" else torch.float32
    v_aug = torch.cat([v.to(dtype), v.new_zeros(B, T, H, K, dtype=dtype)], dim=-1)
    h0 = torch.cat([k.new_zeros(B, H, K, V, dtype=torch.float32),
                    torch.eye(K, dtype=torch.float32, device=k.device).expand(B, H, K, K)], dim=-1)
    _, S = scan(q=None, k=k, v=v_aug, beta=beta, g=g, h0=h0, scale=1.0, options=options)
    return S[..., :V], S[..., V:]
