"""longscan: sequence-parallel training of linear-attention and hybrid language models."""

__version__ = "0.1.0"
