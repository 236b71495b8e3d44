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


# configs/hybrid_1b_1m.yaml as it was before memory.blocks: one float32 input offloaded a stage (a mixer and an
# MLP a block); the tests of per-stage offload at 1M tokens apply these overrides to it
PER_STAGE_1M = ["model.residual_dtype=float32", "memory.blocks=none", "memory.linear_layers=offload",
                "memory.softmax_layers=offload", "memory.mlp=offload"]


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


def saved_by_stage(model, cfg, bf16: bool, T: int) -> dict:
    """Bytes of the distinct storages each stage of blocks 0 (linear) and 3 (softmax) saves, per token, in one
    forward of T tokens (under CPU bf16 autocast when bf16)."""
    # per-sequence constants (weights, the decay buffer) are not per-token activations
    params = {id(p.untyped_storage()) for p in (*model.parameters(), *model.buffers())}
    seen: dict = {}
    current = [None]

    def pack(t):
        sid = id(t.untyped_storage())
        if current[0] is not None and sid not in params:
            seen.setdefault(current[0], {})[sid] = t.untyped_storage().nbytes()
        return t

    def tag(name, fn):
        def run(*a):
            current[0] = name
            try:
                return fn(*a)
            finally:
                current[0] = None
        return run
    lin, soft = model.layers["0"], model.layers["3"]
    lin._mixer, lin._ffn, soft._mixer = tag("L", lin._mixer), tag("mlp", lin._ffn), tag("N", soft._mixer)
    tokens = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(tokens, tokens)
    return {k: sum(v.values()) / T for k, v in seen.items()}
