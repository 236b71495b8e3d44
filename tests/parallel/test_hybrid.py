"""A hybrid stack on the zigzag layout equals the single-device stack.

Two pre-norm-free residual layers over x `[B, N, C]`:
  h = x + Wo1 · linear_attention(x Wq1, x Wk1, x Wv1, g = logsigmoid(x Wg))       (SP: every linear method)
  y = h + Wo2 · softmax_attention(rope(h Wq2), rope(h Wk2), h Wv2), GQA, causal     (SP: every softmax method)
RoPE takes its positions from ``longscan.distributed.layouts.positions``, so a zigzag rank rotates its
two pieces by their global positions. Both layers keep the zigzag layout (no re-layout in between).
Checked on every rank in float64: y, dL/dx of the rank's shard, and every weight gradient (summed over
ranks) against the single-device stack built from the naive references.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import rel_err, run_distributed, world_groups, world_results
from longscan.distributed.layouts import positions, shard
from longscan.kernels.linear_attention import naive_recurrent_linear_attention
from longscan.kernels.softmax_attention import naive_attention
from longscan.parallel import linear_attention
from longscan.parallel.softmax import softmax_attention

LINEAR = ("zeco", "lasp2", "lasp1")
SOFTMAX = ("ring", "allgather", "ulysses")
WORLDS = (2, 4)
B, C, H, HKV, K, T_LOCAL = 2, 16, 8, 4, 4, 8

try:
    import deepspeed.sequence.layer  # noqa: F401
    HAVE_DEEPSPEED = True
except Exception:
    HAVE_DEEPSPEED = False


def weights(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(wq1=(C, H * K), wk1=(C, H * K), wv1=(C, H * K), wg=(C, H), wo1=(H * K, C),
                  wq2=(C, H * K), wk2=(C, HKV * K), wv2=(C, HKV * K), wo2=(H * K, C))
    return {n: (torch.randn(*s, generator=gen, dtype=torch.float64) / s[0] ** 0.5) for n, s in shapes.items()}


def rope(x, pos):
    """Rotary embedding of x `[B, T, H, K]` at integer positions `[T]` (rotate-half form)."""
    half = x.shape[-1] // 2
    freq = 1.0 / (100.0 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = pos.double()[:, None] * freq[None, :]                     # [T, K/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def stack(x, w, pos, linear_fn, softmax_fn):
    b, t, _ = x.shape
    heads = lambda y, h: y.view(b, t, h, K)  # noqa: E731
    g = F.logsigmoid(x @ w["wg"])                                    # [B, T, H] data-dependent decay
    o1 = linear_fn(heads(x @ w["wq1"], H), heads(x @ w["wk1"], H), heads(x @ w["wv1"], H), g)
    h = x + o1.reshape(b, t, H * K) @ w["wo1"]
    q2, k2 = rope(heads(h @ w["wq2"], H), pos), rope(heads(h @ w["wk2"], HKV), pos)
    o2 = softmax_fn(q2, k2, heads(h @ w["wv2"], HKV))
    return h + o2.reshape(b, t, H * K) @ w["wo2"]


def hybrid_worker(rank, world_size):
    """Every W of WORLDS in one spawn of the largest (the smaller ones on sub-groups) -> {W: {case: errors}}."""
    groups = world_groups(WORLDS, world_size)
    return {world: world_cases(world, group) for world, group in groups.items() if rank < world}


def world_cases(world, group):
    gen = torch.Generator().manual_seed(world)
    n = T_LOCAL * world
    x = torch.randn(B, n, C, generator=gen, dtype=torch.float64)
    dy = torch.randn(B, n, C, generator=gen, dtype=torch.float64)

    # Single-device reference: naive recurrent linear attention and naive softmax attention.
    w_ref = {k_: t.clone().requires_grad_() for k_, t in weights().items()}
    x_ref = x.clone().requires_grad_()
    y_ref = stack(x_ref, w_ref, torch.arange(n),
                  lambda q, k, v, g: naive_recurrent_linear_attention(q, k, v, g=g)[0],
                  lambda q, k, v: naive_attention(q, k, v, causal=True)[0])
    grads_ref = torch.autograd.grad(y_ref, [x_ref] + list(w_ref.values()), dy)

    sh = lambda t: shard(t, 1, group, "zigzag")  # noqa: E731
    pos = positions(T_LOCAL, group, "zigzag")
    results = {}
    for lin in LINEAR:
        for soft in SOFTMAX:
            if soft == "ulysses" and not HAVE_DEEPSPEED:
                continue
            w = {k_: t.clone().requires_grad_() for k_, t in weights().items()}
            x_loc = sh(x).requires_grad_()
            y = stack(x_loc, w, pos,
                      lambda q, k, v, g: linear_attention(q, k, v, g=g, method=lin, group=group, layout="zigzag")[0],
                      lambda q, k, v: softmax_attention(q, k, v, causal=True, method=soft, group=group,
                                                        layout="zigzag"))
            grads = torch.autograd.grad(y, [x_loc] + list(w.values()), sh(dy))
            errs = {"y": rel_err(y, sh(y_ref)), "dx": rel_err(grads[0], sh(grads_ref[0]))}
            for name, got, want in zip(w, grads[1:], grads_ref[1:]):
                got = got.clone()
                dist.all_reduce(got, group=group)   # each rank holds its tokens' share of a weight gradient
                errs["d" + name] = rel_err(got, want)
            results[(lin, soft)] = errs
    return results


_CACHE = []


@pytest.fixture(scope="module")
def hybrid_results():
    def get(world):
        if not _CACHE:
            _CACHE.append(run_distributed(hybrid_worker, max(WORLDS)))
        return world_results(_CACHE[0], world)
    return get


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("soft", SOFTMAX)
@pytest.mark.parametrize("lin", LINEAR)
def test_hybrid_stack_on_zigzag_equals_single_device(hybrid_results, world, lin, soft):
    if soft == "ulysses" and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed not installed (optional extra)")
    per_rank = hybrid_results(world)
    assert len(per_rank) == world
    for rank, res in enumerate(per_rank):
        for name, err in res[(lin, soft)].items():
            assert err <= 1e-5, f"rank {rank}: {name} rel err {err:.2e} for linear={lin}, softmax={soft}, W={world}"
