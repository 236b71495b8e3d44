#!/usr/bin/env bash
# The container's default command: a short `longscan train` on one GPU with the Triton kernels forced
# (linear and softmax attention) over an NCCL process group, so a broken compiler, driver or NCCL fails
# here, loudly, rather than falling back to the torch kernels. Extra arguments go to `longscan train`.
set -euo pipefail

python - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("longscan smoke test: no GPU is visible; run the container with --gpus all")
import triton

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, {torch.cuda.get_device_name()}", flush=True)
PY

exec longscan train --nproc 1 parallel.sp=1 parallel.linear_backend=triton parallel.softmax_backend=triton \
  schedule.steps=20 schedule.warmup_steps=2 schedule.val_every=0 "$@"
