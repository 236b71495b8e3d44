"""The delta rule's Triton kernels, one stage a file:

- ``intra_fwd``: every chunk's own quantities (the WY / UT representation: A, P = (I + A)⁻¹ by forward
  substitution, W, U_0, tril(Q̃K̂ᵀ), Q̃, K̄, the chunk's total log gate), one program a chunk;
- ``inter``: the recurrence across chunks, forward and backward, one program per sequence, head and block
  of V columns;
- ``intra_bwd``: the gradients of q, k, v, β and g from those of the chunks' quantities;
- ``chunk``: the entry that composes them (an autograd.Function), ``options``: its settings;
- ``common``: the `@triton.jit` helpers the kernels share (their prologues: program ids to offsets, bases and
  masks; the state a chain starts from; a chunk's K Kᵀ and Q Kᵀ);
- path="wy" (``options.path``; the default "auto" runs it for bf16 inputs, these float32 kernels otherwise),
  tensor-core products on the inputs' dtype, chunks of 64: ``wy_prep`` (A, its
  block inverse, W, U), ``wy_state`` (the state across chunks and its gradient, serial), ``wy_output``,
  ``wy_grads`` (the parallel backward stages), composed by ``wy``.
"""
from longscan.kernels.delta_rule.triton.chunk import scan
from longscan.kernels.delta_rule.triton.options import DeltaTritonOptions

__all__ = ["scan", "DeltaTritonOptions"]
