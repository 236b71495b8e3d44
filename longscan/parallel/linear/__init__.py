"""Sequence-parallel linear attention: one public function, one file per method, a registry of methods."""
from __future__ import annotations

from longscan.kernels.linear_attention import LinearKernelOptions
from longscan.parallel.linear.common import LinearSPMethod, run_method
from longscan.parallel.linear.lasp1 import LASP1, lasp1_linear_attention
from longscan.parallel.linear.lasp2 import LASP2, lasp2_linear_attention
from longscan.parallel.linear.zeco import ZECO, zeco_linear_attention

REGISTRY: dict[str, LinearSPMethod] = {m.name: m for m in (ZECO, LASP2, LASP1)}
METHODS = tuple(REGISTRY)


def linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     method="zeco", group=None, layout="contiguous", backend="auto", n_blocks=4, overlap=False,
                     options: LinearKernelOptions | None = None):
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
    options: the Triton kernels' :class:`LinearKernelOptions` (None: the defaults).
    """
    if method not in REGISTRY:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return run_method(REGISTRY[method], q, k, v, g, g_gamma, scale, initial_state, output_final_state, group,
                      layout, backend, n_blocks, overlap, options)


__all__ = ["linear_attention", "zeco_linear_attention", "lasp2_linear_attention", "lasp1_linear_attention",
           "METHODS", "REGISTRY", "LinearSPMethod"]
