"""Prefix L2 norms with the hand-written CUDA kernel in csrc/prefix_norms.cu."""
from __future__ import annotations

import functools

import torch

from .._nesting import nesting
from . import loader

_ENTRY = {
    torch.float32: "prefix_norms_f32",
    torch.float16: "prefix_norms_f16",
    torch.bfloat16: "prefix_norms_bf16",
}
_WARPS_PER_BLOCK = 8  # one warp per row


@functools.lru_cache(maxsize=64)
def _dims_table(dims: tuple, device: torch.device) -> torch.Tensor:
    # int32 [2, n]: row 0 the dims ascending (the kernel walks prefixes in order), row 1 the output
    # column of each, so results come back in the caller's order. Cached: one H2D copy per dims list.
    geo = nesting(dims)
    return torch.tensor([geo.ascending, geo.order], dtype=torch.int32, device=device)


def prefix_norms_cuda(x: torch.Tensor, dims) -> torch.Tensor:
    """out[:, j] = ||x[:, :dims[j]]||_2 in float32, for x [N, D] fp32/fp16/bf16 on a CUDA device.

    The caller has validated x (2-D, CUDA, stride(1) == 1; any row stride) and dims (unique ints
    in 1..D, any order).
    """
    dims = tuple(int(d) for d in dims)
    n = x.shape[0]
    out = torch.empty((n, len(dims)), dtype=torch.float32, device=x.device)
    if n == 0 or not dims:
        return out
    import numpy  # CuPy's dependency; only needed once a kernel runs

    table = _dims_table(dims, x.device)
    kernel = loader.get_kernel("prefix_norms.cu", _ENTRY[x.dtype], x.device)
    grid = ((n + _WARPS_PER_BLOCK - 1) // _WARPS_PER_BLOCK,)
    args = (x, numpy.int64(n), numpy.int64(x.stride(0)), table[0], table[1],
            numpy.int32(len(dims)), out)
    loader.launch(kernel, grid, (32 * _WARPS_PER_BLOCK,), args, x.device)
    return out
