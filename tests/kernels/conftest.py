"""Kernel tests: without CUDA, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated (at import of the kernel module), so it is set here,
before any test module of this folder imports one. It is left alone when a GPU is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
