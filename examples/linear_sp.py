"""Split one long sequence over the ranks of an SP group and run gated linear attention on it.

    torchrun --nproc-per-node 4 examples/linear_sp.py            # CPU processes over gloo, or GPUs over NCCL

Every rank builds the same global inputs (same seed), keeps its shard, runs the SP operator, and checks
its output shard and the gradient of its keys against one device running the whole sequence.
"""
import os

import torch
import torch.distributed as dist

from longscan.kernels.linear_attention import chunk_linear_attention
from longscan.parallel import linear_attention, shard


def main(method: str = "zeco", layout: str = "zigzag") -> float:
    torch.manual_seed(0)
    B, T, H, K, V = 1, 1024, 4, 32, 32                     # T is the global length
    q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64) for d in (K, K, V))
    g = -0.1 * torch.rand(B, T, H, dtype=torch.float64)     # data-dependent log decay [B, T, H]

    # this rank's shard of every per-token tensor
    q_l, k_l, v_l, g_l = (shard(x, dim=1, layout=layout) for x in (q, k, v, g))
    k_l.requires_grad_()
    o_l, final = linear_attention(q_l, k_l, v_l, g=g_l, output_final_state=True, method=method, layout=layout)
    o_l.sum().backward()

    # the same on one device, whole sequence
    k.requires_grad_()
    o, final_ref = chunk_linear_attention(q, k, v, g=g, output_final_state=True)
    o.sum().backward()
    err = max(((a - b).norm() / b.norm()).item() for a, b in
              ((o_l, shard(o, 1, layout=layout)), (final, final_ref), (k_l.grad, shard(k.grad, 1, layout=layout))))
    print(f"rank {dist.get_rank()}/{dist.get_world_size()} {method} {layout}: max relative error {err:.1e}")
    return err


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main(os.environ.get("METHOD", "zeco"), os.environ.get("LAYOUT", "zigzag"))
    dist.destroy_process_group()
