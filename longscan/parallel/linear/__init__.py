"""Sequence-parallel linear attention: one public function, one file per method."""
from __future__ import annotations

from longscan.distributed import checks
from longscan.parallel.linear.common import METHODS
from longscan.parallel.linear.lasp1 import lasp1_linear_attention
from longscan.parallel.linear.lasp2 import lasp2_linear_attention
from longscan.parallel.linear.zeco import zeco_linear_attention


def linear_attention(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     method="zeco", group=None, layout="contiguous", backend="auto", n_blocks=4, overlap=False,
                     check_replicated=False):
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
    runs beside the zero-prefix output pass, then one more pass over q and o adds the prefix term (on an
    H200 that pass cost more GPU time than a 100 µs collective: benchmarks/RESULTS.md). The backward's
    reverse collective always runs beside the local backward's dq kernel (Triton). Same result either way.
    Every rank of the group must make the same call (shapes, dtypes, method, layout, decay kind, optional
    inputs): checked on every call, with an error naming what differs on which ranks. initial_state and
    g_gamma are replicated: the same tensor on every rank is the caller's contract; check_replicated=True
    (or LONGSCAN_CHECKS=1 in the environment) verifies it, at one all-reduce of their size.
    """
    checks.check_linear_call(group, q, k, v, g, g_gamma, scale, initial_state, output_final_state, method, layout,
                             n_blocks)
    if checks.checks_enabled(check_replicated):
        checks.check_replicated(group, "linear_attention", initial_state=initial_state, g_gamma=g_gamma)
    if method == "zeco":
        return zeco_linear_attention(q, k, v, g, g_gamma, scale, initial_state, output_final_state, group,
                                     layout, backend, n_blocks, overlap)
    if method == "lasp2":
        return lasp2_linear_attention(q, k, v, g, g_gamma, scale, initial_state, output_final_state, group,
                                      layout, backend, overlap)
    if method == "lasp1":
        return lasp1_linear_attention(q, k, v, g, g_gamma, scale, initial_state, output_final_state, group,
                                      layout, backend, overlap)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


__all__ = ["linear_attention", "zeco_linear_attention", "lasp2_linear_attention", "lasp1_linear_attention",
           "METHODS"]
