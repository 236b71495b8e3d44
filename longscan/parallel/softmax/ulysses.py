"""Ulysses attention: all-to-all from sequence-sharded to head-sharded, attend, all-to-all back.

The all-to-alls are DeepSpeed's ``deepspeed.sequence.layer.DistributedAttention`` (optional extra:
``pip install longscan[deepspeed]``). After the first all-to-all each rank holds Hq/W query heads and
Hkv/W kv heads of the *whole* sequence, concatenated rank by rank — for zigzag that is the pieces in the
order 0, 2W-1, 1, 2W-2, ...; so for causal attention the local attention re-orders the sequence into
global order, runs one causal call, and restores the order of its output (the mask must follow global
positions, not the order the all-to-all delivered).

With packed documents the sequence is always re-ordered into global order (document ids must not decrease
along it) and the single-device document mask applies: every rank holds whole sequences for its heads.

Heads are split evenly, so Hq and Hkv must both divide by W (query head h then lands on the rank of its
kv head h // (Hq/Hkv)).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from longscan.distributed.layouts import group_rank_size, num_segments, segment_ids
from longscan.distributed.stats import count, nbytes
from longscan.distributed.documents import cached_on, document_ids, to_device
from longscan.kernels.softmax_attention import BlockDocs, block_backward, block_forward
from longscan.parallel.softmax.function import SoftmaxSPFunction, SoftmaxSPOptions


def _global_order(world: int, layout: str) -> list[int]:
    """Global piece ids in the order the all-to-all delivers them (rank-major)."""
    return [s for r in range(world) for s in segment_ids(r, world, layout)]


def _permute(x, order, n):
    """Re-order the n pieces of x along dim 1 as ``order`` lists them."""
    pieces = x.chunk(n, dim=1)
    return torch.cat([pieces[i] for i in order], dim=1)


def _reorder(world, layout, needs_order):
    """(to_global, to_delivered) piece index lists, or None when the delivered order already works."""
    order = _global_order(world, layout)
    if not needs_order or order == sorted(order):
        return None
    to_global = sorted(range(len(order)), key=lambda i: order[i])   # delivered index of global piece s
    return to_global, order


def _docs(cu_seqlens, q):
    """Document ids of the whole sequence in global order, for q and k alike (None without documents)."""
    if cu_seqlens is None:
        return None
    total, device = q.shape[1], q.device
    ids = cached_on(cu_seqlens, ("ulysses", total, device),
                    lambda: to_device(document_ids(cu_seqlens, total).to(torch.int32), device))
    return BlockDocs(ids, ids)


def ulysses_forward(q, k, v, scale, causal, world, layout, backend, cu_seqlens=None):
    """Local attention of head-sharded q `[B, W·T, Hq/W, D]`, k/v `[B, W·T, Hkv/W, D]` -> (o, lse)."""
    mask = "causal" if causal else "full"
    docs = _docs(cu_seqlens, q)
    perm = _reorder(world, layout, causal or docs is not None)
    if perm is None:
        return block_forward(q, k, v, scale, mask, backend, docs)
    n = num_segments(world, layout)
    to_global, to_delivered = perm
    o, lse = block_forward(*(_permute(x, to_global, n) for x in (q, k, v)), scale, mask, backend, docs)
    return _permute(o, to_delivered, n), _permute(lse.transpose(1, 2), to_delivered, n).transpose(1, 2)


def ulysses_backward(do, q, k, v, o, lse, scale, causal, world, layout, backend, cu_seqlens=None):
    mask = "causal" if causal else "full"
    docs = _docs(cu_seqlens, q)
    perm = _reorder(world, layout, causal or docs is not None)
    if perm is None:
        return block_backward(do, q, k, v, o, lse, scale, mask, backend, docs)
    n = num_segments(world, layout)
    to_global, to_delivered = perm
    do_g, q_g, k_g, v_g, o_g = (_permute(x, to_global, n) for x in (do, q, k, v, o))
    lse_g = _permute(lse.transpose(1, 2), to_global, n).transpose(1, 2)
    grads = block_backward(do_g, q_g, k_g, v_g, o_g, lse_g, scale, mask, backend, docs)
    return tuple(_permute(g, to_delivered, n) for g in grads)


def _count_all_to_all(tensors, world):
    # Each all-to-all keeps 1/W of a tensor and exchanges the rest.
    for t in tensors:
        b = nbytes(t) * (world - 1) // world
        count(sent=b, recv=b, kind="ulysses_all_to_all")


def _distributed_attention_cls():
    try:
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError as e:
        raise ImportError("method='ulysses' needs DeepSpeed (optional extra): "
                          "DS_BUILD_OPS=0 pip install deepspeed   (or pip install longscan[deepspeed]); "
                          f"import failed: {e}") from e
    return DistributedAttention


def _attach_deepspeed_comm() -> None:
    """DeepSpeed's all-to-all goes through ``deepspeed.comm``; point it at our torch process group."""
    import deepspeed.comm as ds_comm
    if not ds_comm.is_initialized():
        # With torch.distributed already initialised this wraps it (no new process group).
        ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)


def check_heads(hq: int, hkv: int, world: int) -> None:
    if hq % world or hkv % world:
        raise ValueError(f"method='ulysses' shards heads over the group: q heads ({hq}) and k/v heads ({hkv}) "
                         f"must both divide by the group size {world}")


class Ulysses:
    """method="ulysses": the hooks are the local attention DeepSpeed's DistributedAttention runs between
    its all-to-alls, on head-sharded q `[B, W·T, Hq/W, D]`, k/v `[B, W·T, Hkv/W, D]`."""
    name = "ulysses"

    def check(self, q, k, world, opts: SoftmaxSPOptions) -> None:
        check_heads(q.shape[2], k.shape[2], world)

    def forward(self, q, k, v, opts: SoftmaxSPOptions):
        _, world = group_rank_size(opts.group)
        o, lse = ulysses_forward(q, k, v, opts.scale, opts.causal, world, opts.layout, opts.backend, opts.cu_seqlens)
        o = o.to(q.dtype)                            # what the second all-to-all carries
        _count_all_to_all((q, k, v, o), world)
        return o, lse

    def backward(self, do, q, k, v, o, lse, opts: SoftmaxSPOptions):
        _, world = group_rank_size(opts.group)
        dq, dk, dv = ulysses_backward(do, q, k, v, o, lse, opts.scale, opts.causal, world, opts.layout,
                                      opts.backend, opts.cu_seqlens)
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        _count_all_to_all((do, dq, dk, dv), world)
        return dq, dk, dv

    def attend(self, q, k, v, opts: SoftmaxSPOptions) -> torch.Tensor:
        DistributedAttention = _distributed_attention_cls()
        _, world = group_rank_size(opts.group)
        check_heads(q.shape[2], k.shape[2], world)

        def local(q_, k_, v_):
            return SoftmaxSPFunction.apply(q_, k_, v_, self, opts)

        if world == 1 and not (dist.is_available() and dist.is_initialized()):
            return local(q, k, v)
        _attach_deepspeed_comm()
        # [B, T, H, D]: scatter the heads (dim 2), gather the sequence (dim 1); batch is dim 0.
        attn = DistributedAttention(local, opts.group if opts.group is not None else dist.group.WORLD,
                                    scatter_idx=2, gather_idx=1)
        return attn(q, k, v, 0)
