"""Split one long sequence over the ranks of an SP group and run causal GQA softmax attention on it.

    torchrun --nproc-per-node 4 examples/softmax_sp.py           # CPU processes over gloo, or GPUs over NCCL
    METHOD=allgather torchrun --nproc-per-node 4 examples/softmax_sp.py

Every rank builds the same global inputs (same seed), keeps its shard, runs the SP operator, and checks
its output shard and the gradients of its keys and values against one device running the whole sequence.
"""
import os

import torch
import torch.distributed as dist

from longscan.kernels.softmax_attention import attention
from longscan.parallel import shard, softmax_attention


def main(method: str = "ring", layout: str = "zigzag") -> float:
    torch.manual_seed(0)
    B, T, Hq, Hkv, D = 1, 512, 8, 4, 32                    # T is the global length; GQA: 2 q heads per kv head
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64) for h in (Hq, Hkv, Hkv))

    # this rank's shard of every per-token tensor
    q_l, k_l, v_l = (shard(x, dim=1, layout=layout).requires_grad_() for x in (q, k, v))
    o_l = softmax_attention(q_l, k_l, v_l, causal=True, method=method, layout=layout)
    o_l.sum().backward()

    # the same on one device, whole sequence
    k.requires_grad_()
    v.requires_grad_()
    o = attention(q, k, v, causal=True, backend="torch")
    o.sum().backward()
    sh = lambda x: shard(x, 1, layout=layout)  # noqa: E731
    err = max(((a - b).norm() / b.norm()).item() for a, b in
              ((o_l, sh(o)), (k_l.grad, sh(k.grad)), (v_l.grad, sh(v.grad))))
    print(f"rank {dist.get_rank()}/{dist.get_world_size()} {method} {layout}: max relative error {err:.1e}")
    return err


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main(os.environ.get("METHOD", "ring"), os.environ.get("LAYOUT", "zigzag"))
    dist.destroy_process_group()
