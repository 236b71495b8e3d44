#!/usr/bin/env bash
# Launch `longscan train` with torchrun on one node or many.
#
#   single node, all GPUs:   launch/torchrun.sh --config configs/hybrid_1b_gpu.yaml data.path=/data/c.bin
#   multi-node (run on every node, same MASTER_ADDR):
#       NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh --config ... [key=value ...]
#       NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh --config ... [key=value ...]
#
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (GPUs on this node, or 4 CPU processes),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500). Everything after the script name goes to `longscan train`.
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
