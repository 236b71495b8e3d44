"""The bytes every SP method moves equal its formula in longscan.observe.comm, kind by kind and rank by rank.

One spawn of 3 gloo processes (W = 3 has a rank in the middle of the chain) runs each linear and delta-rule
method (with and without a final state), each softmax method and the delta-rule layers' short convolution, in
both layouts, forward + backward on random inputs, with a recorder installed; the tests hold each rank's
counts against the formula.
"""
from __future__ import annotations

import pytest
import torch

from harness import run_distributed

W, B, T_LOCAL, H, K, V = 3, 2, 8, 2, 8, 6
HQ, HKV, D = 6, 3, 4        # ulysses needs both head counts divisible by W
LINEAR = [(m, layout, fs) for m in ("zeco", "lasp2", "lasp1") for layout in ("contiguous", "zigzag")
          for fs in (False, True)]
SOFTMAX = [(m, layout) for m in ("ring", "allgather", "ulysses") for layout in ("contiguous", "zigzag")]
DELTA = [(m, tr, layout, fs) for m, tr in (("zeco", "matrix"), ("zeco", "relay"), ("lasp2", "matrix"),
                                           ("lasp1", "matrix"))
         for layout in ("contiguous", "zigzag") for fs in (False, True)]
DELTA_BLOCKS = 3   # ZeCO's blocks of V columns for the delta rule
try:
    import deepspeed.sequence.layer  # noqa: F401
    HAVE_DEEPSPEED = True
except Exception:
    HAVE_DEEPSPEED = False


def _measured(rec) -> dict:
    return {kind: (e.bytes_sent, e.bytes_received, e.calls) for (kind, _), e in rec.comm.items()}


def _cases(rank, world):
    from longscan.distributed import stats
    from longscan.observe.recorder import CommRecorder
    from longscan.parallel import linear_attention, softmax_attention
    out = {}
    gen = torch.Generator().manual_seed(rank)
    for method, layout, fs in LINEAR:
        q, k = (torch.randn(B, T_LOCAL, H, K, generator=gen).requires_grad_() for _ in range(2))
        v = torch.randn(B, T_LOCAL, H, V, generator=gen).requires_grad_()
        g = (-0.1 * torch.rand(B, T_LOCAL, H, generator=gen)).requires_grad_()
        rec = CommRecorder(torch.device("cpu"))
        stats.set_recorder(rec)
        try:
            o, final = linear_attention(q, k, v, g=g, output_final_state=fs, method=method, layout=layout,
                                        backend="torch", n_blocks=4 if method == "zeco" else 1)
            loss = (o * torch.randn_like(o)).sum() + ((final * torch.randn_like(final)).sum() if fs else 0)
            loss.backward()
        finally:
            stats.set_recorder(None)
        out[("linear", method, layout, fs)] = _measured(rec)
    for method, layout in SOFTMAX:
        if method == "ulysses" and not HAVE_DEEPSPEED:
            continue
        q = torch.randn(B, T_LOCAL, HQ, D, generator=gen).requires_grad_()
        k, v = (torch.randn(B, T_LOCAL, HKV, D, generator=gen).requires_grad_() for _ in range(2))
        rec = CommRecorder(torch.device("cpu"))
        stats.set_recorder(rec)
        try:
            o = softmax_attention(q, k, v, method=method, layout=layout, backend="naive")
            (o * torch.randn_like(o)).sum().backward()
        finally:
            stats.set_recorder(None)
        out[("softmax", method, layout)] = _measured(rec)
    for method, transition, layout, fs in DELTA:
        q, k = (torch.randn(B, T_LOCAL, H, K, generator=gen) for _ in range(2))
        q, k = q.requires_grad_(), torch.nn.functional.normalize(k, dim=-1).requires_grad_()
        v = torch.randn(B, T_LOCAL, H, V, generator=gen).requires_grad_()
        beta = torch.rand(B, T_LOCAL, H, generator=gen).requires_grad_()
        g = (-0.1 * torch.rand(B, T_LOCAL, H, generator=gen)).requires_grad_()
        out[("delta", method, transition, layout, fs)] = _delta_traffic(q, k, v, beta, g, method, transition, layout,
                                                                       fs)
    from longscan.models.conv import ShortConvolution
    for layout in ("contiguous", "zigzag"):
        conv = ShortConvolution(5, 5, 0)
        x = torch.randn(B, T_LOCAL, 5, generator=gen).requires_grad_()
        rec = CommRecorder(torch.device("cpu"))
        stats.set_recorder(rec)
        try:
            y = conv(x, torch.distributed.group.WORLD, layout)
            (y * torch.randn(B, T_LOCAL, 5, generator=gen)).sum().backward()
        finally:
            stats.set_recorder(None)
        out[("conv", layout)] = _measured(rec)
    return out


def _delta_traffic(q, k, v, beta, g, method, transition, layout, fs):
    from longscan.distributed import stats
    from longscan.observe.recorder import CommRecorder
    from longscan.parallel import delta_rule_attention
    rec = CommRecorder(torch.device("cpu"))
    stats.set_recorder(rec)
    try:
        o, final = delta_rule_attention(q, k, v, beta, g, output_final_state=fs, method=method, layout=layout,
                                        backend="torch", n_blocks=DELTA_BLOCKS, transition=transition)
        loss = (o * torch.randn_like(o)).sum() + ((final * torch.randn_like(final)).sum() if fs else 0)
        loss.backward()
    finally:
        stats.set_recorder(None)
    return _measured(rec)


@pytest.fixture(scope="module")
def results():
    return run_distributed(_cases, W)


def _expected(traffic) -> dict:
    return {kind: (t.sent, t.recv, t.calls) for kind, t in traffic.items()}


@pytest.mark.parametrize("method,layout,final_state", LINEAR)
def test_linear_bytes_equal_formula(results, method, layout, final_state):
    from longscan.observe.comm import LinearShape, lasp1_bytes, lasp2_bytes, zeco_bytes
    shape = LinearShape(batch=B, heads=H, key_dim=K, value_dim=V, state_bytes_per_elem=4)
    for rank in range(W):
        if method == "zeco":
            want = zeco_bytes(rank, W, layout, shape, n_blocks=4, final_state=final_state)
        elif method == "lasp2":
            want = lasp2_bytes(rank, W, layout, shape, final_state=final_state)
        else:
            want = lasp1_bytes(rank, W, layout, shape, final_state=final_state)
        assert results[rank][("linear", method, layout, final_state)] == _expected(want), f"rank {rank}"


@pytest.mark.parametrize("method,layout", SOFTMAX)
def test_softmax_bytes_equal_formula(results, method, layout):
    if method == "ulysses" and not HAVE_DEEPSPEED:
        pytest.skip("ulysses needs deepspeed")
    from longscan.observe.comm import SoftmaxShape, softmax_method_bytes
    shape = SoftmaxShape(batch=B, local_len=T_LOCAL, q_heads=HQ, kv_heads=HKV, head_dim=D)
    for rank in range(W):
        want = softmax_method_bytes(method, rank, W, layout, shape)
        assert results[rank][("softmax", method, layout)] == _expected(want), f"rank {rank}"


@pytest.mark.parametrize("method,transition,layout,final_state", DELTA)
def test_delta_bytes_equal_formula(results, method, transition, layout, final_state):
    from longscan.observe.comm import LinearShape, delta_method_bytes
    shape = LinearShape(batch=B, heads=H, key_dim=K, value_dim=V, state_bytes_per_elem=4)
    for rank in range(W):
        want = delta_method_bytes(method, rank, W, layout, shape, DELTA_BLOCKS, transition, final_state)
        assert results[rank][("delta", method, transition, layout, final_state)] == _expected(want), f"rank {rank}"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_conv_halo_bytes_equal_formula(results, layout):
    from longscan.observe.comm import conv_halo_bytes
    for rank in range(W):
        want = conv_halo_bytes(rank, W, layout, batch=B, channels=5, elem_bytes=4, width=3, tensors=1)
        assert results[rank][("conv", layout)] == _expected(want), f"rank {rank}"


def test_methods_differ():
    """The formulas are not all the same number: ZeCO and LASP-1 move the same bytes in different calls, LASP-2
    gathers more (W-1 copies), and a middle rank of a contiguous chain moves twice an end rank's."""
    from longscan.observe.comm import LinearShape, lasp1_bytes, lasp2_bytes, total, zeco_bytes
    s = LinearShape(1, 4, 64, 64)
    z, l1, l2 = (total(f(1, 4, "contiguous", s)) for f in (zeco_bytes, lasp1_bytes, lasp2_bytes))
    assert z.sent == l1.sent and z.calls == 4 * l1.calls
    assert l2.sent > z.sent
    assert total(zeco_bytes(1, 4, "contiguous", s)).sent == 2 * total(zeco_bytes(0, 4, "contiguous", s)).sent
    with pytest.raises(ValueError, match="layout"):
        zeco_bytes(0, 2, "striped", s)
