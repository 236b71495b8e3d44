"""The linear SP operators on a GPU (one-rank NCCL group: the CUDA stream path, the GPU kernels).

Multi-rank NCCL runs need several GPUs; this checks what one GPU can: every method and decay
on the default (Triton) backend in bf16 and float32 against the float64 reference.
"""
import os

import pytest
import torch
import torch.distributed as dist

from harness import free_port, rel_err
from linear_cases import DECAYS, make_inputs
from longscan.kernels.linear_attention import naive_recurrent_linear_attention
from longscan.parallel import linear_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def nccl_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("method", ["zeco", "lasp2", "lasp1"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("overlap", [True, False])
def test_sp_on_gpu(nccl_group, method, layout, decay, dtype, tol, overlap):
    if not overlap and dtype == torch.float32:
        pytest.skip("the serial schedule is checked in bf16 (float32 adds nothing it does not)")
    x = make_inputs(decay, 2, 300, 4, 64, 64, torch.float64, seed=5)
    x["q"] = x["q"] * 0.5
    # The reference sees exactly the values the GPU gets (q, k, v in `dtype`, gates and states in float32),
    # so the tolerance measures the kernels, not the rounding of the inputs.
    x = {n: (t.to(dtype if n in ("q", "k", "v") else torch.float32).double() if t is not None else None) for n, t in x.items()}
    leaves = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o_ref, s_ref = naive_recurrent_linear_attention(leaves["q"], leaves["k"], leaves["v"], leaves["g"],
                                                    leaves["g_gamma"], None, leaves["initial_state"], True)
    # g_gamma stays a fixed buffer: the Triton backend refuses a g_gamma that requires grad
    names = [n for n in ("q", "k", "v", "g", "initial_state") if x[n] is not None]
    do = torch.randn_like(o_ref)
    ref = torch.autograd.grad(o_ref, [leaves[n] for n in names], do)

    def dev(t, name):
        keep_fp32 = name in ("g", "g_gamma", "initial_state")   # gates and states stay float32
        if t is None:
            return None
        return t.to("cuda", torch.float32 if keep_fp32 else dtype).requires_grad_(name != "g_gamma")

    gx = {n: dev(t, n) for n, t in x.items()}
    o, s = linear_attention(gx["q"], gx["k"], gx["v"], gx["g"], gx["g_gamma"], initial_state=gx["initial_state"],
                            output_final_state=True, method=method, layout=layout, overlap=overlap)
    grads = torch.autograd.grad(o, [gx[n] for n in names], do.to("cuda", dtype))
    assert rel_err(o.cpu(), o_ref) <= tol
    assert rel_err(s.cpu(), s_ref) <= tol
    for n, got, want in zip(names, grads, ref):
        assert rel_err(got.cpu(), want) <= tol, n
