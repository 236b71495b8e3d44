"""Hybrid linear/softmax decoder-only LM (LASP-2's Linear-Llama3 style) over megatron-core TP layers."""
from longscan.models.args import LINEAR_VARIANTS, ModelConfig, SPSpec
from longscan.models.model import HybridLM

__all__ = ["HybridLM", "ModelConfig", "SPSpec", "LINEAR_VARIANTS"]
