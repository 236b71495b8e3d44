"""Sequence-parallel delta rule (DeltaNet, Gated DeltaNet, KDA): one public function, one file per method."""
from __future__ import annotations

from longscan.parallel.delta_rule.common import METHODS, TRANSITIONS
from longscan.parallel.delta_rule.lasp1 import lasp1_delta_rule
from longscan.parallel.delta_rule.lasp2 import lasp2_delta_rule
from longscan.parallel.delta_rule.zeco import zeco_delta_rule


def delta_rule_attention(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False,
                         method="zeco", group=None, layout="contiguous", backend="auto", n_blocks=4, options=None,
                         transition="matrix"):
    """The delta rule over the ranks of a sequence-parallel group, exactly as on one device.

    Each rank passes its shard of the global sequence (``longscan.parallel.shard``): q, k `[B, T, H, K]`,
    v `[B, T, H, V]`, beta `[B, T, H]` in (0, 1], g None (DeltaNet), `[B, T, H]` (Gated DeltaNet) or
    `[B, T, H, K]` (KDA) log decays ≤ 0. initial_state `[B, H, K, V]`: the state before the global first
    token, the same on every rank. Returns (o `[B, T, H, V]`, the final state `[B, H, K, V]` after the global
    last token on every rank, or None). The gradients of initial_state summed over ranks, with every rank's
    copy of the final state in the loss, give the single-device gradients.
    method: "zeco" (affine All-Scan of carries, V cut into ``n_blocks`` pipelined blocks), "lasp2" (one
    all-gather of the segments' maps), "lasp1" (serial ring). layout: "contiguous" or "zigzag".
    backend: "auto" | "torch" | "triton" | "naive" (see ``longscan.kernels.delta_rule``).
    options: a ``longscan.kernels.delta_rule.triton.DeltaTritonOptions`` for the Triton backend's local stages
    (segment transitions and the output pass; e.g. ``path="wy"``), or None: its defaults.
    transition: how ZeCO applies a rank's segment to the carry: "matrix" (its K×K transition M, formed by a
    scan on V + K value columns, then the output pass) or "relay" (the segment's own state pass run from the
    carry, ``n_blocks`` V blocks pipelined along the chain: one local pass of work, more latency); the other
    methods take "matrix".
    """
    if method == "zeco":
        return zeco_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, group, layout, backend,
                               n_blocks, options, transition)
    if method == "lasp2":
        return lasp2_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, group, layout, backend,
                                options, transition)
    if method == "lasp1":
        return lasp1_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, group, layout, backend,
                                options, transition)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


__all__ = ["delta_rule_attention", "zeco_delta_rule", "lasp2_delta_rule", "lasp1_delta_rule", "METHODS",
           "TRANSITIONS"]
