"""Root pytest configuration.

The Triton interpreter must be switched on before triton is first imported, so this runs
ahead of every test module: on a machine without a CUDA GPU, Triton kernels then execute on
CPU tensors (slowly, but exactly as written). With a GPU the kernels compile for real.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
