"""Prefix L2 norms in plain PyTorch (any device, any float dtype); nothing here validates its inputs
(mrl_kernels.ops.prefix_norms does).

prefix_norms_torch: the chunked fallback. Each column segment between nesting boundaries is reduced once
and the prefixes are a cumsum of squared segment norms, so x[:, :max(dims)] is read once whatever the
number of dims; its gradient (prefix_norms_backward) is a custom one. prefix_norms_eager: one vector_norm
per dim with autograd through torch: fewer ops per call, so faster for small inputs.
prefix_norms_running_sum: squares, one cumsum along the row, the prefix ends picked, a sqrt: four ops
whatever the number of dims, for small inputs that want no gradient (ops/prefix_norms.py says when "auto"
picks which).
"""
from __future__ import annotations

import functools

import torch

from .._nesting import acc_dtype, nesting

# Rows per chunk: bounds the temporaries (the fp32 copy of a chunk that 16-bit inputs need) to
# ROW_CHUNK * D elements, 32 MB at D = 2048.
ROW_CHUNK = 4096


def prefix_norms_torch(x: torch.Tensor, dims) -> torch.Tensor:
    """[N, len(dims)] norms of x[:, :m] in acc_dtype(x.dtype), columns in the caller's order. No autograd
    (the op attaches prefix_norms_backward)."""
    acc = acc_dtype(x.dtype)
    geo = nesting(dims)
    out = torch.empty((x.shape[0], len(dims)), dtype=acc, device=x.device)
    for r in range(0, x.shape[0], ROW_CHUNK):
        chunk = x[r:r + ROW_CHUNK]
        seg_sumsq = torch.stack([torch.linalg.vector_norm(chunk[:, a:b], dim=1, dtype=acc) for a, b in geo.segments],
                                dim=1).square_()
        if geo.in_order:
            torch.cumsum(seg_sumsq, 1, out=out[r:r + ROW_CHUNK]).sqrt_()
        else:
            out[r:r + ROW_CHUNK, list(geo.order)] = seg_sumsq.cumsum(1).sqrt_()
    return out


def prefix_norms_running_sum(x: torch.Tensor, dims) -> torch.Tensor:
    """The same norms from a running sum of squares: an N x max(dims) temporary, so for small x. No
    gradient: sqrt's derivative at a zero prefix is inf, where vector_norm's subgradient is 0."""
    width = max(dims)
    wide = x if width == x.shape[1] else x[:, :width]
    return wide.to(acc_dtype(x.dtype)).square().cumsum(1)[:, _prefix_ends(tuple(dims))].sqrt_()


@functools.lru_cache(maxsize=64)
def _prefix_ends(dims: tuple) -> torch.Tensor:
    return torch.tensor([m - 1 for m in dims])


def prefix_norms_backward(grad_out: torch.Tensor, x: torch.Tensor, norms: torch.Tensor, dims) -> torch.Tensor:
    """d||x[:m]||/dx = x / ||x[:m]|| on the first m columns. Column segment s is inside every prefix
    j >= s, so its gradient is x times the suffix sum over those prefixes of grad_j / norm_j
    (a zero norm contributes nothing, like torch.linalg.norm's subgradient)."""
    geo = nesting(dims)
    acc = norms.dtype
    scale = torch.where(norms > 0, grad_out.to(acc) / norms, torch.zeros((), dtype=acc, device=x.device))
    suffix = scale[:, geo.order].flip(1).cumsum(1).flip(1)  # [N, n_segments], sorted order
    grad = torch.zeros_like(x)
    for s, (a, b) in enumerate(geo.segments):
        grad[:, a:b] = (x[:, a:b].to(acc) * suffix[:, s:s + 1]).to(x.dtype)
    return grad


def prefix_norms_eager(x: torch.Tensor, dims) -> torch.Tensor:
    """The same norms as prefix_norms_torch, one vector_norm per dim, differentiable through torch. A prefix
    as wide as x takes x itself (no slice), and only 16-bit inputs pass a dtype (an upcast on the fly):
    small calls cost what their few ops cost."""
    acc = None if x.dtype in (torch.float32, torch.float64) else torch.float32
    width = x.shape[1]
    norms = [torch.linalg.vector_norm(x if m == width else x[:, :m], dim=1, dtype=acc) for m in dims]
    return norms[0][:, None] if len(norms) == 1 else torch.stack(norms, dim=1)
