#!/usr/bin/env bash
# Launch `longscan train` with torchrun on one node or many (without Slurm; under Slurm use slurm.sbatch).
#
#   single node, all GPUs:   launch/torchrun.sh --config configs/hybrid_1b_gpu.yaml data.path=/data/c.bin
#   multi-node (run on every node, same MASTER_ADDR and MASTER_PORT, its own NODE_RANK):
#       NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh --config ... [key=value ...]
#       NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh --config ... [key=value ...]
#
# Everything after the script name goes to `longscan train`. Environment:
#   NNODES (1)            nodes taking part
#   NODE_RANK (0)         this node's index, 0 .. NNODES-1
#   NPROC_PER_NODE        processes on this node (default: its GPUs, or 4 CPU processes over gloo without one)
#   MASTER_ADDR (127.0.0.1), MASTER_PORT (29500)
#                         node 0's address and a free TCP port on it; two jobs on one node need two ports
#   OMP_NUM_THREADS (1)   CPU threads per process
# NCCL settings (NCCL_DEBUG=INFO, NCCL_SOCKET_IFNAME, NCCL_IB_HCA) are read from the environment; see
# launch/slurm.sbatch for the usual ones. The exit code is torchrun's: 0 when every rank finished.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 4)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --module longscan.cli train "$@"
