"""Cross-rank agreement: a call that differs across the ranks of the SP group raises the same clear error on
every rank (naming what differs and where) instead of hanging or giving a wrong result; replicated inputs are
verified on request. One spawn of two gloo processes computes every case."""
import os
import re

import pytest
import torch

from harness import rel_err, run_distributed
from linear_cases import make_inputs
from longscan.kernels.linear_attention import naive_recurrent_linear_attention
from longscan.kernels.linear_attention import LinearKernelOptions
from longscan.parallel import delta_rule_attention, linear_attention, shard
from longscan.parallel.softmax import softmax_attention


def _outcome(fn):
    try:
        fn()
        return None
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"


def worker(rank, world):
    # imported here: importing Triton kernel modules at collection would decorate them before tests/kernels
    # sets TRITON_INTERPRET
    from longscan.kernels.delta_rule.triton import DeltaTritonOptions
    x = make_inputs("g_scalar", 1, 16, 2, 4, 4, torch.float32, seed=11)
    q, k, v, g, h0 = (shard(x[n], 1) if n in "qkvg" else x[n] for n in ("q", "k", "v", "g", "initial_state"))
    sq = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    one = rank == 1   # the rank that differs
    out = {}
    # every rank calls with T = 8 first (the old check cached this length), then rank 1 with T = 6
    out["first call"] = _outcome(lambda: linear_attention(q, k, v, g=g))
    out["T changes later"] = _outcome(lambda: linear_attention(q[:, :6] if one else q, k[:, :6] if one else k,
                                                               v[:, :6] if one else v, g=g[:, :6] if one else g))
    out["H"] = _outcome(lambda: linear_attention(q[:, :, :1] if one else q, k[:, :, :1] if one else k,
                                                 v[:, :, :1] if one else v))
    out["K"] = _outcome(lambda: linear_attention(q[..., :3] if one else q, k[..., :3] if one else k, v))
    out["dtype"] = _outcome(lambda: linear_attention(*((t.double() if one else t) for t in (q, k, v))))
    out["method"] = _outcome(lambda: linear_attention(q, k, v, method="lasp2" if one else "zeco"))
    out["layout"] = _outcome(lambda: linear_attention(q, k, v, method="lasp1",
                                                      layout="zigzag" if one else "contiguous"))
    out["decay kind"] = _outcome(lambda: linear_attention(q, k, v, g=None if one else g))
    out["initial_state given"] = _outcome(lambda: linear_attention(q, k, v, initial_state=None if one else h0))
    out["n_blocks"] = _outcome(lambda: linear_attention(q, k, v, n_blocks=2 if one else 4))
    out["backend"] = _outcome(lambda: linear_attention(q, k, v, backend="naive" if one else "torch"))
    out["overlap"] = _outcome(lambda: linear_attention(q, k, v, overlap=one))
    out["options"] = _outcome(lambda: linear_attention(q, k, v, options=LinearKernelOptions(chunk=32 if one else 64)))
    beta = torch.sigmoid(q[..., 0])
    out["delta options"] = _outcome(lambda: delta_rule_attention(
        q, k, v, beta, options=DeltaTritonOptions(path="wy") if one else None))
    out["softmax T"] = _outcome(lambda: softmax_attention(sq[:, :6] if one else sq, sq[:, :6] if one else sq,
                                                          sq[:, :6] if one else sq))
    out["softmax Hkv"] = _outcome(lambda: softmax_attention(sq, sq[:, :, :2] if one else sq,
                                                            sq[:, :, :2] if one else sq))
    out["softmax method"] = _outcome(lambda: softmax_attention(sq, sq, sq, method="allgather" if one else "ring"))
    out["softmax causal"] = _outcome(lambda: softmax_attention(sq, sq, sq, causal=not one))
    # replicated inputs: the caller's contract, verified on request only
    h0_bad = h0 + (0.5 if one else 0.0)
    out["replicated unchecked"] = _outcome(lambda: linear_attention(q, k, v, initial_state=h0_bad))
    out["replicated checked"] = _outcome(lambda: linear_attention(q, k, v, initial_state=h0_bad,
                                                                  check_replicated=True))
    gamma = -0.1 * torch.ones(2) - (0.25 if one else 0.0)
    out["g_gamma checked"] = _outcome(lambda: linear_attention(q, k, v, g_gamma=gamma, check_replicated=True))
    out["replicated equal"] = _outcome(lambda: linear_attention(q, k, v, initial_state=h0, check_replicated=True))
    os.environ["LONGSCAN_CHECKS"] = "1"
    out["replicated env"] = _outcome(lambda: linear_attention(q, k, v, initial_state=h0_bad))
    del os.environ["LONGSCAN_CHECKS"]
    # after all of the above the ranks are still in step: an agreeing call gives the single-device result
    o, s = linear_attention(q, k, v, g=g, initial_state=h0, output_final_state=True, layout="contiguous")
    o_ref, s_ref = naive_recurrent_linear_attention(*(x[n].double() for n in ("q", "k", "v", "g")), None, None,
                                                    x["initial_state"].double(), True)
    out["errors after"] = (rel_err(o, shard(o_ref, 1)), rel_err(s, s_ref))
    return out


@pytest.fixture(scope="module")
def results():
    # on code that does not check, a differing rank hangs in a collective: the timeout makes that a failure
    return run_distributed(worker, 2, timeout=180)


EXPECTED = {
    "T changes later": r"T \(q.shape\[1\], the local length\) must be equal on every rank of the SP group: "
                       r"8 on rank 0; 6 on rank 1",
    "H": r"H must be equal on every rank of the SP group: 2 on rank 0; 1 on rank 1",
    "K": r"K must be equal on every rank of the SP group: 4 on rank 0; 3 on rank 1",
    "dtype": r"dtype must be equal on every rank of the SP group: 'torch.float32' on rank 0; 'torch.float64' on rank 1",
    "method": r"method must be equal on every rank of the SP group: 'zeco' on rank 0; 'lasp2' on rank 1",
    "layout": r"layout must be equal on every rank of the SP group: 'contiguous' on rank 0; 'zigzag' on rank 1",
    "decay kind": r"decay_kind must be equal on every rank of the SP group: 'scalar' on rank 0; 'none' on rank 1",
    "initial_state given": r"initial_state must be equal on every rank of the SP group: "
                           r"\(\(1, 2, 4, 4\), 'torch.float32'\) on rank 0; None on rank 1",
    "n_blocks": r"n_blocks must be equal on every rank of the SP group: 4 on rank 0; 2 on rank 1",
    "backend": r"backend must be equal on every rank of the SP group: 'torch' on rank 0; 'naive' on rank 1",
    "overlap": r"overlap must be equal on every rank of the SP group: False on rank 0; True on rank 1",
    "options": r"options must be equal on every rank of the SP group: 'LinearKernelOptions\(\)' on rank 0; "
               r"'LinearKernelOptions\(chunk=32\)' on rank 1",
    "delta options": r"delta_rule_attention: .*options must be equal on every rank of the SP group: None on rank 0; "
                     r"\"DeltaTritonOptions\(path='wy'\)\" on rank 1",
    "softmax T": r"softmax_attention: .*T \(q.shape\[1\], the local length\) must be equal.*8 on rank 0; 6 on rank 1",
    "softmax Hkv": r"softmax_attention: .*k must be equal on every rank",
    "softmax method": r"method must be equal on every rank of the SP group: 'ring' on rank 0; 'allgather' on rank 1",
    "softmax causal": r"causal must be equal on every rank of the SP group: True on rank 0; False on rank 1",
    "replicated checked": r"initial_state must be the same tensor on every rank of the SP group \(a replicated "
                          r"input\); it differs from rank 0's on rank 1 \(max abs diff 0.5\)",
    "g_gamma checked": r"g_gamma must be the same tensor on every rank.*rank 1 \(max abs diff 0.25\)",
    "replicated env": r"initial_state must be the same tensor on every rank",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_differing_calls_raise_the_same_error_on_every_rank(results, case):
    messages = [r[case] for r in results]
    assert messages[0] is not None and re.search(EXPECTED[case], messages[0]), messages[0]
    assert messages[0] == messages[1]   # the same error on every rank
    assert messages[0].startswith("CrossRankMismatch: ")   # a ValueError (caught as one above)


def test_agreeing_calls_pass_and_ranks_stay_in_step(results):
    for r in results:
        assert r["first call"] is None and r["replicated equal"] is None
        assert r["replicated unchecked"] is None   # the contract is not checked unless asked
        assert max(r["errors after"]) < 1e-5
