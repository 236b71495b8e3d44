"""The sequence-tiled MLP (its norm included) equals the MLP on the whole sequence, forward and backward.

Float64: ``tiled`` against the plain function on random inputs (tiles that do not divide T, one tile, one
token a tile), and SwiGLU.tiled_with_norm against SwiGLU(RMSNorm(x)) at TP = 1 and TP = 2 (two gloo
processes, megatron-core's column/row layers): output, input gradient and every weight's gradient.
The tiled mixers (memory.mixer_tile): a small LLLN model's loss and every gradient against the untiled model
for each token-wise linear variant, at TP 1 and 2, with the mixer kept and checkpointed; and softmax layers
with packed documents (per-row RoPE tables cut along the tiles).
"""
from __future__ import annotations

import pytest
import torch

from harness import each_tp, rel_err, run_distributed, tp_model
from longscan.models.mlp import norm_swiglu
from longscan.models.tiling import tiled

B, T, D, F = 2, 23, 8, 24
# rms_norm computes in float32 (by design), so the norm weight's gradient, a sum over tokens taken per tile
# here and at once there, agrees to float32 round-off; everything else is the same per-token arithmetic
TOLS = [1e-12, 1e-12, 1e-6, 1e-12, 1e-12, 1e-12]


def _fn(x, nw, w1, w3, w2):
    return norm_swiglu(x, nw, w1, w3, w2, 1e-5)


def _grads(f, x, params, gy):
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    y = f(x, params)
    y.backward(gy)
    return [y.detach(), x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("tile", [1, 5, 23, 64])
def test_tiled_equals_whole_sequence(tile):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    params = [1 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)] + \
             [torch.randn(*s, generator=g, dtype=torch.float64) / s[1] ** 0.5 for s in ((F, D), (F, D), (D, F))]
    gy = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    ref = _grads(lambda x, p: _fn(x, *p), x, params, gy)
    out = _grads(lambda x, p: tiled(_fn, x, p, tile), x, params, gy)
    for a, b, tol in zip(out, ref, TOLS):
        assert rel_err(a, b) < tol


def test_tile_must_be_positive():
    x = torch.randn(1, 4, D)
    with pytest.raises(ValueError, match="tile must be a positive number of tokens"):
        tiled(lambda t: t, x, [], 0)


def _swiglu(rank, world):
    from longscan.models.args import ModelConfig
    from longscan.models.mlp import SwiGLU
    from longscan.models.norms import RMSNorm
    from longscan.training.parallel import stage_config
    out = {}
    for tp in each_tp():
        cfg = ModelConfig(dim=D, ffn_dim=F, n_layers=2)
        torch.manual_seed(3)
        mlp = SwiGLU(cfg, stage_config(tp, 1, 1, D, torch.float32)).double()
        norm = RMSNorm(D).double()
        with torch.no_grad():
            norm.weight.add_(0.1 * torch.randn(D, dtype=torch.float64))
        g = torch.Generator().manual_seed(4)
        x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        gy = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        for name, f in (("whole", lambda t: mlp(norm(t))), ("tiled", lambda t: mlp.tiled_with_norm(t, norm, 6))):
            for p in (*mlp.parameters(), norm.weight):
                p.grad = None
            xt = x.clone().requires_grad_()
            y = f(xt)
            y.backward(gy)
            out[(tp, name)] = [y.detach(), xt.grad, norm.weight.grad] + \
                              [p.grad.clone() for p in (mlp.w1.weight, mlp.w3.weight, mlp.w2.weight)]
    return out


@pytest.fixture(scope="module")
def swiglu():
    return run_distributed(_swiglu, 2)


@pytest.mark.parametrize("tp", [1, 2])
def test_tiled_swiglu_with_norm(swiglu, tp):
    for res in swiglu:
        # at TP 2 the input gradient's two column-layer parts meet in another order before the float32 norm
        for a, b, tol in zip(res[(tp, "tiled")], res[(tp, "whole")], [1e-12, 1e-6] + TOLS[2:]):
            assert rel_err(a, b) < tol
    if tp == 2:  # the TP-split whole MLP is the TP=1 one: output, input and norm gradients
        for res in swiglu:
            for a, b in zip(res[(2, "tiled")][:3], res[(1, "whole")][:3]):
                assert rel_err(a, b) < 1e-6


def test_tiled_under_bf16_autocast_recomputes_in_bf16():
    """The backward recomputes each tile under the forward's autocast: the output and the input gradient are
    the untiled ones to the bit (a float32 recomputation would differ at bf16 round-off); the weights'
    gradients, a bf16 matmul over all tokens there and a float32 sum of per-tile ones here, to bf16 round-off."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 64, D, generator=g)
    params = [1 + 0.1 * torch.randn(D, generator=g)] + \
             [torch.randn(*s, generator=g) / s[1] ** 0.5 for s in ((F, D), (F, D), (D, F))]
    gy = torch.randn(B, 64, D, generator=g)

    def run(f):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _grads(lambda x, p: f(x, p).float(), x, params, gy)
    ref = run(lambda x, p: _fn(x, *p))
    out = run(lambda x, p: tiled(_fn, x, p, 16))
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert rel_err(out[2], ref[2]) < 1e-6
    for a, b in zip(out[3:], ref[3:]):
        assert rel_err(a, b) < 1e-2


@pytest.mark.parametrize("shape, wshape", [((2, 5, 8), (8,)), ((2, 5, 3, 8), (3, 8))])
def test_rms_norm_backward_matches_autograd(shape, wshape):
    """The norm's own backward (it keeps x and 1/rms only) against autograd through the same float32 maths,
    for the model width and per head (HeadRMSNorm's `[H, V]` weight)."""
    from longscan.models.norms import rms_norm

    def autograd_norm(x, w, eps):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)
    g = torch.Generator().manual_seed(6)
    x, gy = torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(*wshape, generator=g)
    out = _grads(lambda x, p: rms_norm(x, p[0], 1e-5), x, [w], gy)
    ref = _grads(lambda x, p: autograd_norm(x, p[0], 1e-5), x, [w], gy)
    assert out[1].dtype == torch.float64 and out[2].shape == wshape
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-6


def test_tiled_along_tensors_and_tuple_outputs():
    """fn returning a tuple, with a table cut along the tokens like x (RoPE's cos/sin), tiled and whole."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    table = torch.randn(1, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, D, generator=g, dtype=torch.float64)
    gys = [torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(2)]

    def fn(xt, tt, wt):
        y = xt @ wt.T
        return y * tt, torch.tanh(y) + tt

    def run(f):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        ys = f(xr, wr)
        torch.autograd.backward(ys, gys)
        return [*(y.detach() for y in ys), xr.grad, wr.grad]
    ref = run(lambda xr, wr: fn(xr, table, wr))
    out = run(lambda xr, wr: tiled(fn, xr, (wr,), 5, along=(table,)))
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-12
    with pytest.raises(ValueError, match="along"):
        tiled(fn, x, (w,), 5, along=(table[:, :4],))


MIXER_VARIANTS = ("linear", "lightning", "simple_gla", "gla")


def _mixer_tiles(rank, world):
    """Loss and every gradient of a small LLLN model with memory.mixer_tile against the same model untiled
    (float64; the mixer stage kept and checkpointed), at TP = 2 and TP = 1."""
    from longscan.models.args import MemoryOptions, ModelConfig
    from longscan.models.model import SPSpec
    out = {}
    for tp in each_tp():
        for variant in MIXER_VARIANTS:
            cfg = ModelConfig(dim=16, n_layers=4, pattern="LLLN", n_heads=4, n_kv_heads=2, linear_variant=variant,
                              vocab_size=64)
            tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(8))
            for name, mem in (("whole", MemoryOptions()), ("tiled", MemoryOptions(mixer_tile=7)),
                              ("tiled+ckpt", MemoryOptions("checkpoint", "checkpoint", mixer_tile=16))):
                model = tp_model(cfg, SPSpec(linear_backend="torch"), tp, memory=mem).double()
                with torch.no_grad():  # norm weights away from 1, so their gradients matter
                    for n, p in model.named_parameters():
                        if "norm" in n:
                            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9),
                                                     dtype=p.dtype))
                loss = model(tokens, tokens)
                loss.backward(torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss))
                out[(tp, variant, name)] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
        # bf16 autocast (float32 weights), the MLP and the loss tiled too (megatron's layers take no CPU autocast
        # backward): against the float32 step without mixer tiles
        cfg = ModelConfig(dim=16, n_layers=4, pattern="LLLN", n_heads=4, n_kv_heads=2, vocab_size=64)
        tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(11))
        for name, mem, bf16 in (("whole", MemoryOptions(mlp_tile=7, loss_chunk=8), False),
                                ("tiled", MemoryOptions("offload", "offload", mlp_tile=7, loss_chunk=8,
                                                        mixer_tile=7), True)):
            model = tp_model(cfg, SPSpec(linear_backend="torch"), tp, memory=mem)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(tokens, tokens)
            loss.mean().backward()
            out[(tp, "bf16", name)] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
        # packed documents through softmax layers: per-row RoPE tables cut along the tiles, cu_seqlens
        cfg = ModelConfig(dim=16, n_layers=2, pattern="N", n_heads=4, n_kv_heads=2, vocab_size=64)
        tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(10))
        cu = [torch.tensor([0, 15, 40]), torch.tensor([0, 22, 31, 40])]
        pos = torch.stack([torch.cat([torch.arange(n) for n in torch.diff(c).tolist()]) for c in cu])
        for name, mem in (("whole", MemoryOptions()), ("tiled", MemoryOptions(mixer_tile=9))):
            model = tp_model(cfg, SPSpec(softmax_backend="torch"), tp, memory=mem).double()
            loss = model(tokens, tokens, cu_seqlens=cu, doc_positions=pos)
            loss.backward(torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss))
            out[(tp, "documents", name)] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    return out


@pytest.fixture(scope="module")
def mixer_tiles():
    return run_distributed(_mixer_tiles, 2)


@pytest.mark.parametrize("tp", [1, 2])
def test_mixer_tile_under_bf16_autocast(mixer_tiles, tp):
    """The tiled mixers under bf16 autocast, recomputed (offload) under it: the float32 step's loss and
    gradients to bf16 round-off."""
    for res in mixer_tiles:
        for a, b in zip(res[(tp, "bf16", "tiled")], res[(tp, "bf16", "whole")]):
            assert rel_err(a, b) < 3e-2


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("variant", MIXER_VARIANTS + ("documents",))
def test_mixer_tile_equals_untiled_model(mixer_tiles, tp, variant):
    # the norms compute in float32 (by design): their weights' gradients, summed per tile here, agree to its round-off
    for res in mixer_tiles:
        ref = res[(tp, variant, "whole")]
        for name in ("tiled", "tiled+ckpt") if variant != "documents" else ("tiled",):
            out = res[(tp, variant, name)]
            assert len(out) == len(ref)
            for a, b in zip(out, ref):
                assert rel_err(a, b) < 1e-6, name


def test_mixer_tile_refuses_the_delta_rule():
    from longscan.training.config import ConfigError, load_config, validate
    with pytest.raises(ConfigError, match="memory.mixer_tile = 64 needs a token-wise mixer"):
        validate(load_config(None, ["model.linear_variant=deltanet", "memory.mixer_tile=64"]), 4)
