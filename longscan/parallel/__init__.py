"""SP operators = kernels + distributed. One file per method, all of the same shape."""
from longscan.distributed.layouts import positions, shard, unshard
from longscan.parallel.linear import linear_attention
from longscan.parallel.delta_rule import delta_rule_attention  # noqa: F401

__all__ = ["linear_attention", "shard", "unshard", "positions"]

try:  # the softmax operators land in their own package; expose them here when present
    from longscan.parallel.softmax import softmax_attention  # noqa: F401
    __all__.append("softmax_attention")
except ImportError:
    pass
