"""Linear attention on one device, behind one contract (:class:`LinearBackend`, docs/design.md).

Backends: "naive" (recurrent reference), "torch" (chunked, CPU default), "triton" (GPU default),
"fla" (flash-linear-attention, when installed, for side-by-side checks); "auto" picks triton on CUDA.

Packed documents (``cu_seqlens``) enter the backends in :data:`RESET_BACKENDS` as resets: a log decay of -inf at
every document's first token but the sequence's first drops the state whole, so no document sees another (the
SP operators carry such resets exactly); per-document initial and final states are added around the kernels
(``documents.py``). On one device fla, whose kernels are not checked with -inf here, runs the documents as the
rows of a zero-padded batch instead (without states).
"""
from __future__ import annotations

import importlib

import torch

from longscan.kernels import saved
from longscan.kernels.checks import check_linear_qkv
from longscan.kernels.linear_attention.backend import LinearBackend, NaiveBackend, TorchBackend
from longscan.kernels.linear_attention.documents import (base_log_decay, check_finite_decay, document_finals,
                                                         document_resets, document_rows, document_runs, run_decays,
                                                         start_outputs, with_resets_gate)
from longscan.kernels.linear_attention.naive import naive_recurrent_linear_attention
from longscan.kernels.linear_attention.options import LaunchConfig, LinearKernelOptions, with_resets

BACKENDS = ("auto", "naive", "torch", "triton", "fla")
# the backends that compute a log decay of -inf (a full reset) exactly, so the ones that take packed documents
RESET_BACKENDS = ("naive", "torch", "triton")
# (module, class) of the backends that import optional packages (triton, fla) only when asked for
_LAZY = {"triton": ("longscan.kernels.linear_attention.triton", "TritonBackend"),
         "fla": ("longscan.kernels.linear_attention.fla_backend", "FlaBackend")}


def _lazy(name: str, options: LinearKernelOptions | None) -> LinearBackend:
    module, cls = _LAZY[name]
    backend_cls = getattr(importlib.import_module(module), cls)
    return backend_cls(options) if name == "triton" else backend_cls()


def get_backend(name: str, device: torch.device, options: LinearKernelOptions | None = None) -> LinearBackend:
    """The backend for ``name`` ("auto": triton on CUDA when importable, else torch). options: the Triton
    kernels' (None: the defaults; the other backends have none)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if options is not None and not isinstance(options, LinearKernelOptions):
        raise TypeError(f"options must be a LinearKernelOptions or None, got {type(options).__name__}")
    if name == "auto":
        if device.type == "cuda":
            try:
                return _lazy("triton", options)
            except ImportError:
                pass
        return TorchBackend()
    if name == "naive":
        return NaiveBackend()
    if name == "torch":
        return TorchBackend()
    try:
        return _lazy(name, options)
    except ImportError as e:
        raise ValueError(f"backend={name!r} is not available here: {e}") from e


def check_backend_supports(impl: LinearBackend, g_gamma) -> None:
    """Refuse what a backend would compute wrongly rather than return it."""
    if g_gamma is not None and g_gamma.requires_grad and not impl.supports_g_gamma_grad:
        raise ValueError(f"g_gamma requires grad, but backend {impl.name!r} does not give "
                         "an accurate g_gamma gradient; keep g_gamma fixed (detach it) or use backend='torch'")


def check_log_decay(name: str, x) -> None:
    """Refuse a log decay above 0 (its exp grows without bound: NaN for large values). Reading the values back
    stalls a GPU stream, so on CUDA the check runs only behind the opt-in checks (LONGSCAN_CHECKS=1)."""
    from longscan.distributed.checks import checks_enabled   # at call time: distributed imports the kernels
    if x is None or not x.numel() or (x.device.type != "cpu" and not checks_enabled()):
        return
    with torch.no_grad():
        if bool((x > 0).any()):
            raise ValueError(f"{name} (a log decay) must be <= 0, got a maximum of {x.max().item():.4g}")


def check_inputs(q, k, v, g=None, g_gamma=None, initial_state=None) -> None:
    """Raise ValueError/TypeError naming the parameter when shapes, dtypes or devices disagree, or when a log
    decay is above 0 (on CUDA only with LONGSCAN_CHECKS=1: the check reads the values back)."""
    B, T, H, K, V = check_linear_qkv(q, k, v)
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
    check_log_decay("g", g)
    check_log_decay("g_gamma", g_gamma)
    if initial_state is not None:
        if tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}, got {tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on q's device ({q.device}), got {initial_state.device}")


def check_documents(q, initial_state, output_final_state: bool, backend: str, impl: LinearBackend | None = None,
                    one_device: bool = False, cu_seqlens=None) -> None:
    """Refuse what packed documents (``cu_seqlens``) cannot come with: a batch above 1, an initial_state that is
    not one state per document `[N, H, K, V]`, states on the fla backend (which runs documents as batch rows, on one
    device only), and over an SP group (not ``one_device``) a backend outside :data:`RESET_BACKENDS` (``impl``:
    what ``backend`` resolved to; None: check the name alone, before resolving it)."""
    if q.shape[0] != 1:
        raise ValueError("cu_seqlens packs documents into one sequence: q must be [1, T, H, K], got batch "
                         f"{q.shape[0]}")
    if initial_state is not None and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1:
        _, _, H, K = q.shape
        expected = (cu_seqlens.numel() - 1, H, K, initial_state.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state with cu_seqlens of {expected[0]} documents must be one state per "
                             f"document [N, H, K, V] = {expected}, got {tuple(initial_state.shape)}")
    name = impl.name if impl is not None else backend
    if (initial_state is not None or output_final_state) and name == "fla":
        picked = "" if name == backend else f" (backend={backend!r} picked 'fla')"
        raise ValueError(f"backend={backend!r}{picked} runs packed documents as the rows of a padded batch, without "
                         "per-document initial_state or output_final_state; use backend='torch', 'naive' or "
                         "'triton' for per-document states")
    if not one_device and name not in RESET_BACKENDS + ("auto",):
        picked = "" if name == backend else f" (backend={backend!r} picked {name!r} on {q.device.type})"
        raise ValueError(f"cu_seqlens (packed documents) over an SP group needs backend='torch', 'naive' or "
                         f"'triton' (parallel.linear_backend in training), got backend={backend!r}{picked}: "
                         "documents enter as log decays of -inf, which only those backends are known to compute "
                         "exactly (on one device the others take documents as batch rows); use backend='triton' "
                         "on CUDA, 'torch' elsewhere")


def _as_rows(q, k, v, g, g_gamma, scale, impl, cu_seqlens):
    """Packed documents of a batch-1 sequence run as the rows `[N, longest, ...]` of a batch: each row a document
    then zeros (q = k = v = 0 and a log decay of 0 after its end add nothing to its tokens); the outputs are
    read back at the tokens' places. Autograd runs through the scatter and the gather."""
    places = document_rows(cu_seqlens, q.shape[1], q.device)
    doc, pos, n, longest = places.doc, places.pos, cu_seqlens.numel() - 1, places.longest

    def rows(x):
        return x.new_zeros((n, longest) + tuple(x.shape[2:])).index_put((doc, pos), x[0])
    o = _ChunkLinearAttention.apply(rows(q), rows(k), rows(v), rows(g) if g is not None else None, g_gamma, None,
                                    scale, False, impl)[0]
    return o[doc, pos].unsqueeze(0), None


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, g_gamma, initial_state, scale, output_final_state, impl):
        # what the backend's forward hands its backward (Triton: the segment prefixes, h0 included, and the
        # per-key gate operands), asked for only when a backward will come; as saved tensors, so that activation
        # checkpointing frees them too (longscan.kernels.saved)
        o, ht, kept_record = impl.forward(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                                          keep=any(ctx.needs_input_grad))
        kept, ctx.record = saved.pack(kept_record)
        ctx.save_for_backward(q, k, v, g, g_gamma, initial_state, *kept)
        ctx.scale, ctx.impl = scale, impl
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, g_gamma, h0, *kept = ctx.saved_tensors
        need_dg = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        record = saved.unpack(kept, ctx.record)
        dq, dk, dv, dgate, dh0 = ctx.impl.backward(q, k, v, g, g_gamma, ctx.scale, h0, do, dht, need_dg,
                                                   saved=record)
        dg = dgate if g is not None else None
        dgg = dgate if g_gamma is not None else None
        return dq, dk, dv, dg, dgg, (dh0.to(h0.dtype) if h0 is not None else None), None, None, None


def chunk_linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                           output_final_state=False, backend="auto", options: LinearKernelOptions | None = None,
                           cu_seqlens=None):
    """Linear attention with optional diagonal decay on one device, with autograd.

    q, k `[B, T, H, K]`; v `[B, T, H, V]`; g `[B, T, H]` or `[B, T, H, K]` or g_gamma `[H]` (log decays);
    initial_state `[B, H, K, V]`. Log decays must be <= 0: a positive one is refused with a ValueError (CPU
    tensors always; CUDA tensors with LONGSCAN_CHECKS=1, since checking reads them back).
    Returns (o `[B, T, H, V]`, final state `[B, H, K, V]` float32 or None).
    options: the Triton kernels' :class:`LinearKernelOptions` (None: the defaults). A g holding -inf (a full
    reset) needs ``options.resets`` on the Triton backend (naive and torch take -inf always).
    cu_seqlens: packed documents, int32/int64 `[N + 1]` offsets (fla's convention) with B = 1: every document
    is attended alone (torch, naive, triton: a reset, log decay -inf, at its first token, with options.resets
    turned on; fla: the documents as the rows of a zero-padded batch). initial_state is then `[N, H, K, V]`, the
    state each document starts from, and the final state `[N, H, K, V]` each document's state after its last
    token (not on fla). The gradient of g (or g_gamma) at a document's first token is 0 without initial_state.
    The offsets are validated and turned into resets on the first call with a tensor, then cached on it.
    Same conventions as flash-linear-attention's chunk_simple_gla / chunk_gla.
    """
    documents = cu_seqlens is not None
    check_inputs(q, k, v, g, g_gamma, None if documents else initial_state)
    if documents:
        check_documents(q, initial_state, output_final_state, backend, one_device=True, cu_seqlens=cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # documents enter as -inf gates: the Triton kernels then compile their reset arithmetic (options.resets)
    impl = get_backend(backend, q.device, with_resets(options) if documents else options)
    check_backend_supports(impl, g_gamma)
    if not documents:
        return _ChunkLinearAttention.apply(q, k, v, g, g_gamma, initial_state, scale, output_final_state, impl)
    check_documents(q, initial_state, output_final_state, backend, impl, one_device=True, cu_seqlens=cu_seqlens)
    if initial_state is not None and initial_state.device != q.device:
        raise ValueError(f"initial_state must be on q's device ({q.device}), got {initial_state.device}")
    if impl.name not in RESET_BACKENDS:
        return _as_rows(q, k, v, g, g_gamma, scale, impl, cu_seqlens)
    states = initial_state is not None or output_final_state
    if states:
        check_finite_decay(g)
    resets = document_resets(cu_seqlens, q.shape[1], device=q.device)
    base = base_log_decay(q, g, g_gamma)
    o, _ = _ChunkLinearAttention.apply(q, k, v, with_resets_gate(base, resets), None, None, scale, False, impl)
    if not states:
        return o, None
    runs = document_runs(cu_seqlens, q.shape[1], device=q.device, value_dim=v.shape[-1])
    decays = run_decays(base, runs, q.dtype)
    if initial_state is not None:
        o = o + start_outputs(q, base, initial_state, runs, decays, scale).to(o.dtype)
    final = document_finals(k, v, base, initial_state, None, runs, decays) if output_final_state else None
    return o, final


__all__ = ["chunk_linear_attention", "naive_recurrent_linear_attention", "get_backend", "check_inputs",
           "check_documents", "RESET_BACKENDS", "with_resets", "document_resets", "document_runs", "base_log_decay",
           "with_resets_gate", "check_log_decay", "check_backend_supports", "LinearBackend", "LinearKernelOptions",
           "LaunchConfig", "BACKENDS"]
