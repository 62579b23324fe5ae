"""Hand-written CUDA kernels (csrc/*.cu), compiled at run time with CuPy/NVRTC.

Importing this package needs neither CuPy nor a GPU; `cupy_available()` says whether the kernels can run.
"""
from .loader import cupy_available, csrc_dir, get_kernel, launch, require_cupy
from .prefix_norms import prefix_norms_cuda

__all__ = ["cupy_available", "csrc_dir", "get_kernel", "launch", "require_cupy", "prefix_norms_cuda"]
