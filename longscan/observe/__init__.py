"""Observability: `longscan profile` (communication and compute per layer), `longscan sweep` (sequence length
scaling), `longscan plan` (a cost model) and model FLOP utilisation (flops.py)."""
