"""Cross-rank agreement checks for the SP operators.

Every rank of an SP group must make the same call: the same shapes, dtype, method, layout, decay kind and
optional inputs. A rank that differs would otherwise hang in a collective of another size, abort inside the
backend, or give a silently wrong result. :func:`check_same_call` compares the whole call signature on
every call with one all-gather of a small int64 tensor, and raises the same error on every rank.

Replicated inputs (the same tensor on every rank, e.g. ``initial_state``) are the caller's contract;
:func:`check_replicated` verifies it on request (``check_replicated=True`` or ``LONGSCAN_CHECKS=1``).
"""
from __future__ import annotations

import dataclasses
import os
import zlib

import torch
import torch.distributed as dist

from longscan.distributed.layouts import group_rank_size

# Fields in one signature, at most: the payload has a fixed size so that ranks calling with different
# field sets still meet in one all-gather of equal size.
MAX_FIELDS = 31
ENV_CHECKS = "LONGSCAN_CHECKS"


class CrossRankMismatch(ValueError):
    """Ranks of one group disagree on a call that must be the same on every rank."""


def checks_enabled(check_replicated: bool = False) -> bool:
    """Whether the opt-in checks run: the argument, or ``LONGSCAN_CHECKS=1`` in the environment."""
    if not isinstance(check_replicated, bool):
        raise TypeError(f"check_replicated must be True or False, got {check_replicated!r}")
    return check_replicated or os.environ.get(ENV_CHECKS, "0") == "1"


def _code(value) -> int:
    """A stable int64 code of a field value (ints as themselves, anything else by a hash of its text)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and -2**62 < value < 2**62:
        return value
    # not Python's hash(): that one is salted per process
    return 2**62 + zlib.crc32(repr(value).encode())


def _device_for(group, device) -> torch.device:
    """Where the payload lives: on the CPU when the group's backend takes CPU tensors (gloo: no GPU sync),
    else on ``device`` or the current CUDA device (NCCL)."""
    if "gloo" in str(dist.get_backend(group)):
        return torch.device("cpu")
    if device is not None and torch.device(device).type != "cpu":
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _describe(op: str, signatures: list[dict]) -> str:
    """The error message: every field whose value differs, with the ranks holding each value."""
    keys = list(dict.fromkeys(k for s in signatures for k in s))
    lines = []
    for key in keys:
        values = [s.get(key, "<absent>") for s in signatures]
        if len({repr(v) for v in values}) == 1:
            continue
        by_value: dict = {}
        for r, v in enumerate(values):
            by_value.setdefault(repr(v), []).append(r)
        what = "; ".join(f"{v} on {_ranks(rs)}" for v, rs in by_value.items())
        if key == "T":
            lines.append(f"T (q.shape[1], the local length) must be equal on every rank of the SP group: {what}")
        else:
            lines.append(f"{key} must be equal on every rank of the SP group: {what}")
    return f"{op}: the ranks of the SP group made different calls: " + " | ".join(lines)


def check_same_call(group, op: str = "call", device=None, **fields) -> None:
    """Raise :class:`CrossRankMismatch` on every rank of ``group`` unless every rank passed equal ``fields``.

    ``fields``: ints, bools, strings, dtypes, None or tuples of them (e.g. B=2, T=1024, dtype=q.dtype,
    method="zeco"). One all-gather of ``MAX_FIELDS + 1`` int64 values per call; where they differ, one more
    collective (an object all-gather, every rank takes it together) fetches the values for the message.
    ``device``: where the payload goes for a backend that takes no CPU tensors (NCCL); on gloo it stays on
    the CPU. No group (or one rank): nothing to check.
    """
    _, world = group_rank_size(group)
    if world == 1:
        return
    if len(fields) > MAX_FIELDS:
        raise ValueError(f"check_same_call takes at most {MAX_FIELDS} fields, got {len(fields)}")
    codes = [_code(tuple(fields))] + [_code(v) for v in fields.values()]
    codes += [0] * (MAX_FIELDS + 1 - len(codes))
    mine = torch.tensor(codes, dtype=torch.int64, device=_device_for(group, device))
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    if bool((torch.stack(everyone) == mine).all()):
        return
    signatures: list = [None] * world
    dist.all_gather_object(signatures, {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in fields.items()},
                           group=group)
    raise CrossRankMismatch(_describe(op, signatures))


def check_replicated(group, op: str = "call", **tensors) -> None:
    """Raise :class:`CrossRankMismatch` on every rank unless each given tensor is the same on every rank.

    ``tensors``: name -> tensor or None (None is skipped; whether it is given at all belongs to
    :func:`check_same_call`). Exact comparison: one all-reduce (max) of every tensor next to its negation
    gives the element-wise spread over the ranks; where it is not zero, one broadcast of rank 0's copy
    and one all-gather of the differences name the ranks.
    """
    _, world = group_rank_size(group)
    given = {n: t for n, t in tensors.items() if t is not None}
    if world == 1 or not given:
        return
    flat = torch.cat([t.detach().reshape(-1).double() for t in given.values()])
    both = torch.cat([flat, -flat])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    spread = both[:flat.numel()] + both[flat.numel():]   # max over ranks - min over ranks
    if not bool((spread != 0).any()):   # NaN spreads (a NaN on some rank) count as different too
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    first = flat.clone()
    dist.broadcast(first, src, group=group)
    diffs, start = [], 0
    for t in given.values():
        n = t.numel()
        d = (flat[start:start + n] - first[start:start + n]).abs()
        diffs.append(float("nan") if d.isnan().any() else float(d.max()) if n else 0.0)
        start += n
    mine = torch.tensor(diffs, dtype=torch.float64, device=flat.device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    lines = []
    for i, name in enumerate(given):
        bad = [(r, float(everyone[r][i])) for r in range(world) if not float(everyone[r][i]) == 0.0]
        if bad:
            lines.append(f"{name} must be the same tensor on every rank of the SP group (a replicated input); "
                         f"it differs from rank 0's on " + ", ".join(f"rank {r} (max abs diff {d:.3g})"
                                                                     for r, d in bad))
    raise CrossRankMismatch(f"{op}: " + " | ".join(lines))


def decay_kind(g, g_gamma) -> str:
    """The decay kind of a linear-attention call, for its signature ("both" is refused by the local checks)."""
    if g_gamma is not None:
        return "g_gamma" if g is None else "both"
    if g is None:
        return "none"
    return "per_key" if isinstance(g, torch.Tensor) and g.dim() == 4 else "scalar"


def shape_fields(x, names: str) -> dict:
    """``{name: size}`` of a tensor's dimensions (names one letter each), or its whole shape when the
    number of dimensions is not the expected one (the local checks then name the problem)."""
    if not isinstance(x, torch.Tensor):
        return {names: type(x).__name__}
    if x.dim() != len(names):
        return {names: tuple(x.shape)}
    return dict(zip(names, x.shape))


def _spec(x):
    """(shape, dtype) of a tensor input, None when not given (or its type's name when not a tensor)."""
    if x is None:
        return None
    return (tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else type(x).__name__


def _dtype(x):
    return str(x.dtype) if isinstance(x, torch.Tensor) else None


def _options(options):
    """Kernel options as text naming the fields set away from their defaults (the message shows it; some options
    hold views that do not pickle)."""
    if options is None:
        return None
    if not dataclasses.is_dataclass(options):
        return repr(options)
    default = type(options)()
    set_ = [f"{f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(default, f.name)]
    return f"{type(options).__name__}({', '.join(set_)})"


def _device(x):
    return x.device if isinstance(x, torch.Tensor) else None


def check_linear_call(group, q, k, v, g, g_gamma, scale, initial_state, output_final_state, method, layout,
                      n_blocks, cu_seqlens=None, backend=None, overlap=None, options=None) -> None:
    """:func:`check_same_call` for ``longscan.parallel.linear_attention``: B, T, H, K (from q), q's dtype,
    the shapes and dtypes of k, v and of the optional inputs, the decay kind, scale, output_final_state,
    method, layout, ZeCO's n_blocks, the number of packed documents, the backend asked for, the forward's
    schedule (overlap) and the kernels' options (ranks on other kernels would each compute another
    rounding of the operator). Equal signatures make the local checks that follow agree too."""
    check_same_call(group, "linear_attention", _device(q), **shape_fields(q, "BTHK"), dtype=_dtype(q),
                    k=_spec(k), v=_spec(v), decay_kind=decay_kind(g, g_gamma), g=_spec(g), g_gamma=_spec(g_gamma),
                    initial_state=_spec(initial_state), scale=scale, output_final_state=output_final_state,
                    method=method, layout=layout, n_blocks=n_blocks if method == "zeco" else None,
                    cu_seqlens=_spec(cu_seqlens), backend=backend, overlap=overlap, options=_options(options))


def check_softmax_call(group, q, k, v, causal, scale, method, layout, chunk_heads, cu_seqlens=None) -> None:
    """:func:`check_same_call` for ``longscan.parallel.softmax.softmax_attention``: B, T, H, D (from q), q's
    dtype, the shapes and dtypes of k and v, causal, scale, method, layout, chunk_heads and the number of
    packed documents."""
    check_same_call(group, "softmax_attention", _device(q), **shape_fields(q, "BTHD"), dtype=_dtype(q),
                    k=_spec(k), v=_spec(v), causal=causal, scale=scale, method=method, layout=layout,
                    chunk_heads=chunk_heads, cu_seqlens=_spec(cu_seqlens))


def check_delta_call(group, q, k, v, beta, g, scale, initial_state, output_final_state, method, layout,
                     n_blocks, backend=None, options=None, transition=None) -> None:
    """:func:`check_same_call` for ``longscan.parallel.delta_rule_attention``: B, T, H, K (from q), q's dtype,
    the shapes and dtypes of k, v, beta and of the optional inputs, scale, output_final_state, method, layout,
    ZeCO's n_blocks, the backend asked for and the Triton options (e.g. path: ranks on other paths would each
    compute another rounding of the operator)."""
    check_same_call(group, "delta_rule_attention", _device(q), **shape_fields(q, "BTHK"), dtype=_dtype(q),
                    k=_spec(k), v=_spec(v), beta=_spec(beta), g=_spec(g), initial_state=_spec(initial_state),
                    scale=scale, output_final_state=output_final_state, method=method, layout=layout,
                    n_blocks=n_blocks if method == "zeco" else None, backend=backend, options=_options(options),
                    transition=transition)
