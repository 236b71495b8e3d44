"""Shared helpers of the training tests: a tiny config and parameter/gradient gathering across ranks."""
from __future__ import annotations

import numpy as np
import torch

# Tiny model on short sequences of the stdlib corpus. optimizer.eps is large so that the first AdamW
# update (≈ lr·g/(|g|+eps)) is a smooth function of the gradient: with eps=1e-8 it is ≈ lr·sign(g), and
# float32 noise in near-zero gradient entries would flip signs and hide real agreement.
TINY = {
    "model": {"dim": 64, "n_layers": 4, "pattern": "LLLN", "n_heads": 4, "n_kv_heads": 2,
              "linear_variant": "lightning"},
    "parallel": {"tp": 1, "pp": 1, "sp": 1, "dp": 0, "layout": "zigzag"},
    "data": {"seq_len": 64, "global_batch_size": 4, "micro_batch_size": 1},
    "optimizer": {"lr": 1e-3, "eps": 1e-4, "grad_clip": 1.0},
    "schedule": {"steps": 10, "warmup_steps": 0, "val_every": 0, "val_batches": 1},
    "logging": {"log_every": 1000},
}


def tiny(**sections) -> dict:
    """TINY with per-section overrides, e.g. tiny(parallel={"sp": 2})."""
    out = {k: dict(v) for k, v in TINY.items()}
    for sec, vals in sections.items():
        out.setdefault(sec, {}).update(vals)
    return out


def local_tensors(trainer) -> dict:
    """name -> (param, grad, partition_dim or None) of this rank, plus its coordinates."""
    r = trainer.ranks
    out = {}
    for name, p in trainer.model.named_parameters():
        dim = getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
        # numpy, not tensors: torch would pass tensors through shared memory owned by the exiting worker
        grad = p.grad if p.grad is not None else torch.full_like(p, float("nan"))  # DeepSpeed frees grads
        out[name] = (p.detach().cpu().numpy().copy(), grad.detach().cpu().numpy().copy(), dim)
    return {"tp_rank": r.tp_rank, "pp_rank": r.pp_rank, "sp_rank": r.sp_rank, "dp_rank": r.dp_rank,
            "tensors": out}


def assemble(results: list[dict]) -> tuple[dict, dict]:
    """Full (unsharded) params and grads from every rank's local_tensors; checks that DP/SP replicas
    agree exactly (the gradient all-reduce makes them identical)."""
    shards: dict = {}
    for res in results:
        for name, (p, g, dim) in res["tensors"].items():
            p, g = torch.from_numpy(p), torch.from_numpy(g)
            key = (name, res["tp_rank"])
            if key in shards:
                p0, g0, _ = shards[key]
                assert torch.equal(p0, p) and torch.equal(g0, g, ) or torch.equal(p0, p) and g.isnan().all(), \
                    f"replicas of {name} differ"
            else:
                shards[key] = (p, g, dim)
    params, grads = {}, {}
    for name in sorted({k[0] for k in shards}):
        parts = sorted((t, v) for (n, t), v in shards.items() if n == name)
        dim = parts[0][1][2]
        if dim is None:
            params[name], grads[name] = parts[0][1][0], parts[0][1][1]
        else:
            params[name] = torch.cat([v[0] for _, v in parts], dim=dim)
            grads[name] = torch.cat([v[1] for _, v in parts], dim=dim)
    return params, grads


EOS = 256   # the packed-document tests' end-of-document token, past their 256-token alphabet


def stream(seed=0, n_docs=300) -> list:
    """A stream of random documents (1 to 23 tokens each, no EOS inside) for the packing tests."""
    gen = np.random.default_rng(seed)
    return [gen.integers(0, 256, int(gen.integers(1, 24))) for _ in range(n_docs)]
