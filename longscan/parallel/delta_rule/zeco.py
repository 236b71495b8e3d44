"""ZeCO for the delta rule: only carries `[K, V]` travel, pipelined in blocks of V columns. How a rank applies
its segment to the carry is ``transition``:

"matrix" (the default): each rank applies its own transition M (``longscan.distributed.affine_scan``).
  forward:  (M, S_loc) of each local segment -> the affine All-Scan -> the output pass from the carry.
  backward: the reverse All-Scan of the carries' gradients under Mᵀ, from the sum of the final-state
            gradients -> the local stages' gradients by autograd.
"relay": each rank runs its segment's own state pass from the carry, block by block (``relay``): no M, one
  local pass of work, a chain of (hops + n_blocks - 1) block passes of latency.
"""
from __future__ import annotations

from longscan.distributed.affine_scan import affine_all_scan
from longscan.parallel.delta_rule.common import delta_rule_sp, make_context
from longscan.parallel.delta_rule.relay import relay_delta_rule_sp
from longscan.parallel.linear.common import all_reduce_sum, broadcast_from


class ChainScan:
    """The chain of carries along the global order; ``n_blocks`` V blocks pipelined (1: LASP-1's ring)."""

    def __init__(self, n_blocks: int | None = None):
        self.n_blocks = n_blocks   # None: the context's

    def scan(self, sp, M, S, initial, output_final_state):
        blocks = self.n_blocks or sp.n_blocks
        P, last = affine_all_scan(M, S, sp.group, sp.layout, blocks, initial)
        final = broadcast_from(last, sp.last_owner, P[0], sp) if output_final_state else None
        return P, final, None

    def scan_back(self, sp, M, dP, dN, kept):
        blocks = self.n_blocks or sp.n_blocks
        dN = all_reduce_sum(dN, sp) if dN is not None else None
        R, first = affine_all_scan(M.transpose(-1, -2), dP, sp.group, sp.layout, blocks, dN, reverse=True)
        return R, (first if sp.rank == sp.first_owner else None)


def zeco_delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, group=None,
                    layout="contiguous", backend="auto", n_blocks=4, options=None, transition="matrix"):
    """The delta rule on this rank's shard with ZeCO's All-Scan of carries. See ``delta_rule_attention``."""
    sp = make_context(q, k, v, beta, g, scale, initial_state, output_final_state, "zeco", group, layout, backend,
                      n_blocks, options, transition)
    if sp.transition == "relay":
        return relay_delta_rule_sp(sp, q, k, v, beta, g, initial_state, output_final_state)
    return delta_rule_sp(ChainScan(), sp, q, k, v, beta, g, initial_state, output_final_state)
