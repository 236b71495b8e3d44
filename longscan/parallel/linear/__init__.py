"""Sequence-parallel linear attention: one public function, one file per method, a registry of methods."""
from __future__ import annotations

from longscan.distributed import checks
from longscan.kernels.linear_attention import LinearKernelOptions
from longscan.parallel.linear.common import METHODS, LinearSPMethod, run_method
from longscan.parallel.linear.documents import run_documents
from longscan.parallel.linear.lasp1 import LASP1, lasp1_linear_attention
from longscan.parallel.linear.lasp2 import LASP2, lasp2_linear_attention
from longscan.parallel.linear.zeco import ZECO, zeco_linear_attention

REGISTRY: dict[str, LinearSPMethod] = {m.name: m for m in (ZECO, LASP2, LASP1)}
if tuple(REGISTRY) != METHODS:
    raise ImportError(f"the linear SP registry {tuple(REGISTRY)} does not match METHODS {METHODS}")


def linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     method="zeco", group=None, layout="contiguous", backend="auto", n_blocks=4, overlap=False,
                     check_replicated=False, options: LinearKernelOptions | None = None, cu_seqlens=None):
    """Linear attention over the ranks of a sequence-parallel group, exactly as on one device.

    Each rank passes its shard of the global sequence (see ``longscan.parallel.shard``):
      q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H]` or `[B, T, H, K]` (log decays) or g_gamma `[H]`.
    initial_state `[B, H, K, V]` is the state before the global first token (same on every rank).
    Returns (o `[B, T, H, V]`, final state `[B, H, K, V]` after the global last token on every rank, or None).
    method: "zeco" (All-Scan, K split into ``n_blocks``), "lasp2" (one all-gather), "lasp1" (serial ring).
    group: a torch.distributed process group (None = the default group; no group needs no communication).
    layout: "contiguous" or "zigzag". backend: "auto" | "torch" | "triton" | "naive" | "fla".
    overlap: the forward's schedule. False (default): the output pass waits for the collective and starts
    from the prefix (no extra pass; the collective's latency is not hidden). True: on CUDA the collective
    runs beside the zero-prefix output pass, then one more pass over q and o adds the prefix term
    (docs/benchmarks.md compares the two). The backward's reverse collective always runs beside the local
    backward's dq kernel (Triton). Same result either way.
    Every rank of the group must make the same call (shapes, dtypes, method, layout, decay kind, optional
    inputs): checked on every call, with an error naming what differs on which ranks. initial_state and
    g_gamma are replicated: the same tensor on every rank is the caller's contract; check_replicated=True
    (or LONGSCAN_CHECKS=1 in the environment) verifies it, at one all-reduce of their size.
    options: the Triton kernels' :class:`LinearKernelOptions` (None: the defaults).
    cu_seqlens: packed documents, int32/int64 `[N + 1]` offsets into the *global* sequence (fla's convention),
    the same on every rank, with B = 1: each document is attended alone, as a reset (log decay -inf) at its first
    token. Backends "torch", "naive" and "triton" (those that compute -inf exactly). initial_state is then
    `[N, H, K, V]`, the state each document starts from (the same on every rank), and the final state
    `[N, H, K, V]` each document's state after its last token, on every rank.
    """
    checks.check_linear_call(group, q, k, v, g, g_gamma, scale, initial_state, output_final_state, method, layout,
                             n_blocks, cu_seqlens, backend=backend, overlap=overlap, options=options)
    if checks.checks_enabled(check_replicated):
        checks.check_replicated(group, "linear_attention", initial_state=initial_state, g_gamma=g_gamma)
    if method not in REGISTRY:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if cu_seqlens is not None:
        return run_documents(REGISTRY[method], q, k, v, g, g_gamma, scale, initial_state, output_final_state, group,
                             layout, backend, n_blocks, overlap, options, cu_seqlens)
    return run_method(REGISTRY[method], q, k, v, g, g_gamma, scale, initial_state, output_final_state, group,
                      layout, backend, n_blocks, overlap, options)


__all__ = ["linear_attention", "zeco_linear_attention", "lasp2_linear_attention", "lasp1_linear_attention",
           "METHODS", "REGISTRY", "LinearSPMethod"]
