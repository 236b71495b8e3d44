"""Host-side plan of the linear-attention kernels: what they accept, the gate kind and chunk size, launch
settings, and how a sequence is cut into segments (one plan for every entry point, so the segment states one
call computes fit the next)."""
from __future__ import annotations

import os

import torch
import triton

from longscan.kernels.linear_attention.options import LinearKernelOptions

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DIMS = (16, 32, 64, 128)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(*xs) -> None:
    """Clear errors for what these kernels do not support (the torch backend covers the rest)."""
    q = xs[0]
    if q.dtype not in _DTYPES:
        raise TypeError(f"triton linear attention supports {_DTYPES}, got {q.dtype} (use backend='torch')")
    for x in xs:
        if x is None:
            continue
        if x.device.type != "cuda" and not _interpreting():
            raise ValueError(f"triton linear attention needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    for name, d in (("K", q.shape[-1]),) + tuple(("V", x.shape[-1]) for x in xs[1:2] if x is not None):
        if d not in _DIMS:
            raise ValueError(f"triton linear attention supports head dims {_DIMS}, got {name}={d}")


def _gate(g, g_gamma, q, opts: LinearKernelOptions):
    """-> (GATE kind, g tensor or dummy, g_gamma tensor or dummy, chunk size)."""
    if g_gamma is not None:
        return 1, q, g_gamma.contiguous(), opts.chunk
    if g is None:
        return 0, q, q, opts.chunk
    if g.dim() == 3:
        return 2, g.contiguous(), q, opts.chunk
    return 3, g.contiguous(), q, opts.chunk_per_key


def _resets(g, GATE, opts: LinearKernelOptions) -> bool:
    """Whether the kernels compile their reset arithmetic (RESETS): options.resets, for the gates g (GATE 2, 3).
    Without it a −inf in g is refused where that costs no host synchronisation: CPU tensors always, CUDA
    tensors only with the opt-in checks (LONGSCAN_CHECKS=1); otherwise the finite-gate arithmetic gives NaN."""
    if GATE < 2:
        return False
    if opts.resets:
        return True
    from longscan.distributed.checks import checks_enabled   # at call time: distributed imports the kernels
    if g.device.type == "cpu" or checks_enabled():
        resets = int((g == float("-inf")).sum())
        if resets:
            raise ValueError(f"g holds -inf (a full reset) at {resets} entries, but LinearKernelOptions.resets is "
                             "False: the Triton kernels take -inf in g only with options=LinearKernelOptions("
                             "resets=True) (packed documents, cu_seqlens, turn it on themselves); without it the "
                             "result is NaN")
    return False


def _state_products(name, GATE, dtype, need_dg, opts: LinearKernelOptions) -> int:
    """_state_dot's mode for kernel ``name``: 0 (in the inputs' dtype) unless the gate gradient needs float32
    precision; then two bf16 halves or tf32 for bf16 inputs (opts.state_products_bf16), tf32 for float16 (whose
    range might not hold a state's halves)."""
    if not (need_dg and dtype != torch.float32 and opts.gate_grad_f32_state):
        return 0
    return opts.state_products_bf16.get((GATE, name), 1) if dtype == torch.bfloat16 else 1


def _split_scores(GATE, dtype, need_dg, opts: LinearKernelOptions) -> bool:
    """The dq kernel's SPLIT, its intra-chunk scores as two halves in the inputs' dtype: per-key gates with
    opts.dq_scores_split_per_key; the scalar decays with opts.dq_scores_split where the gate gradient is not asked
    for (the constant decay of lightning attention among them), where the second dot compiles without spills on
    Triton 3.6 (with the gate gradient the scalar gate's dq kernel spilled more: kernel_resources.py). float32
    inputs take the scores whole."""
    if dtype == torch.float32 or not GATE:
        return False
    if GATE == 3:
        return opts.dq_scores_split_per_key
    return opts.dq_scores_split and not need_dg


def _prec(x, opts: LinearKernelOptions) -> str:
    # float32 inputs get float32-precision products (tf32 alone would cost ~3e-4 relative error)
    return opts.float32_products if x.dtype == torch.float32 else "tf32"


def _launch(name: str, dim: int, GATE: int, dtype: torch.dtype, opts: LinearKernelOptions):
    """-> (tile along a dimension of size dim, the remaining launch settings) of kernel ``name`` on inputs of
    ``dtype``."""
    cfg = opts.launch_config(name, GATE == 3, float32=dtype == torch.float32)
    return min(dim, cfg.block), cfg.launch()


def _num_sms(device, opts: LinearKernelOptions) -> int:
    if opts.num_sms is not None:
        return opts.num_sms
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _segments(programs: int, n_chunks: int, device, opts: LinearKernelOptions) -> int:
    """Segments per sequence: none while there are opts.split_below programs per SM (a split adds state passes),
    else as many as give at most opts.programs_per_sm programs per SM, no segment under opts.min_segment_chunks
    chunks. At most, not at least: a few programs past a whole number of waves leave a last wave almost empty."""
    if opts.segments is not None:
        return max(1, min(opts.segments, n_chunks))
    sms = _num_sms(device, opts)
    if programs >= opts.split_below * sms:
        return 1
    want = opts.programs_per_sm * sms // programs
    return max(1, min(want, n_chunks // opts.min_segment_chunks))


def _layout(T: int, C: int, ns: int):
    """-> (segment length in tokens (a multiple of C), number of segments)."""
    n = triton.cdiv(T, C)
    seg = triton.cdiv(n, ns) * C
    return seg, triton.cdiv(T, seg)


def _split(B, H, T, V, C, GATE, dtype, device, opts: LinearKernelOptions):
    """-> (segment length, number of segments) of a sequence; one plan for every entry point, so the
    segment states one call computes fit the next."""
    programs = B * H * (V // _launch("fwd", V, GATE, dtype, opts)[0])
    n = triton.cdiv(T, C)
    ns = _segments(programs, n, device, opts)
    if dtype == torch.float32 and GATE >= 2 and opts.segments is None and opts.f32_gate_segment_chunks:
        ns = max(ns, triton.cdiv(n, opts.f32_gate_segment_chunks))   # gate gradients' sums restart per segment
    return _layout(T, C, ns)


def _in_bf16(x, g) -> bool:
    """Per-key gates on float16 inputs run in bf16: kn = k⊙exp(−b) may reach exp(LEVEL_SPAN), far past float16's
    range (a gate falling below about −11 inside a chunk gave NaN), while bf16 has float32's exponents."""
    return x.dtype == torch.float16 and g is not None and g.dim() == 4


def _bf16(*xs):
    return tuple(x.to(torch.bfloat16) if x is not None else None for x in xs)

