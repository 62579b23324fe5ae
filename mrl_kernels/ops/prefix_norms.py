"""mk.prefix_norms: L2 norms of every nesting prefix of every row, in one pass."""
from __future__ import annotations

import torch

from .. import reference
from ._backend import resolve_backend
from ._validation import check_dims, check_tensor

IMPLEMENTED = ("triton", "cuda", "torch", "reference")
# Rows per chunk in the torch fallback: bounds its fp32 temporary to ROW_CHUNK * D elements.
ROW_CHUNK = 4096


def prefix_norms(x: torch.Tensor, dims, backend: str = "auto") -> torch.Tensor:
    """For each row of `x` [N, D] and each m in `dims`, the L2 norm of x[:m]: a [N, len(dims)] tensor,
    columns in the order of `dims`. fp16/bf16 inputs give fp32 norms (accumulated in fp32); fp32 and
    fp64 inputs give their own dtype. Differentiable with respect to x.

    backend: "auto" (Triton on CUDA tensors, the torch fallback on the CPU), "triton", "cuda" (CuPy),
    "torch" or "reference".
    """
    check_tensor(x, "x", ndim=2)
    dims = check_dims(dims, x.shape[1])
    backend = resolve_backend("prefix_norms", backend, x.device, IMPLEMENTED)
    if backend in ("triton", "cuda") and x.dtype == torch.float64:
        raise TypeError(f"prefix_norms: backend={backend!r} takes fp32/fp16/bf16 x, got float64; "
                        "use backend='torch'")
    return _prefix_norms_op(x, list(dims), backend)


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def segments(dims):
    """The sorted dims as consecutive [start, end) column segments, plus each segment's output column."""
    order = sorted(range(len(dims)), key=lambda j: dims[j])
    bounds = [0] + [dims[j] for j in order]
    return list(zip(bounds[:-1], bounds[1:])), order


def prefix_norms_torch(x: torch.Tensor, dims) -> torch.Tensor:
    """Each column segment's norm is reduced once (vector_norm needs no temporary for its squares) and
    the prefixes are a cumsum of squared segment norms; chunks of rows bound the fp32 copies that 16-bit
    inputs need."""
    acc = out_dtype(x.dtype)
    segs, order = segments(dims)
    out = torch.empty((x.shape[0], len(dims)), dtype=acc, device=x.device)
    for r in range(0, x.shape[0], ROW_CHUNK):
        chunk = x[r:r + ROW_CHUNK]
        seg_sumsq = torch.stack([torch.linalg.vector_norm(chunk[:, a:b], dim=1, dtype=acc) for a, b in segs],
                                dim=1).square_()
        out[r:r + ROW_CHUNK, order] = seg_sumsq.cumsum(1).sqrt()
    return out


def _run(x: torch.Tensor, dims, backend: str) -> torch.Tensor:
    if backend == "triton":
        from ..kernels.prefix_norms import prefix_norms_triton

        return prefix_norms_triton(_unit_column_stride(x), dims)
    if backend == "cuda":
        from ..cuda.prefix_norms import prefix_norms_cuda

        return prefix_norms_cuda(_unit_column_stride(x), dims)
    if backend == "torch":
        return prefix_norms_torch(x, dims)
    return reference.prefix_norms(x, dims).to(out_dtype(x.dtype))


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride but assume adjacent columns; a column slice like x[:, :512] keeps it.
    return x if x.stride(1) == 1 else x.contiguous()


@torch.library.custom_op("mrl_kernels::prefix_norms", mutates_args=())
def _prefix_norms_op(x: torch.Tensor, dims: list[int], backend: str) -> torch.Tensor:
    return _run(x, dims, backend)


@_prefix_norms_op.register_fake
def _(x, dims, backend):
    return x.new_empty((x.shape[0], len(dims)), dtype=out_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    x, dims, _ = inputs
    ctx.save_for_backward(x, output)
    ctx.dims = dims


def _backward(ctx, grad_out):
    """d||x[:m]||/dx = x / ||x[:m]|| on the first m columns. Column segment s is inside every prefix
    j >= s, so its gradient is x times the suffix sum over those prefixes of grad_j / norm_j
    (a zero norm contributes nothing, like torch.linalg.norm's subgradient)."""
    x, norms = ctx.saved_tensors
    segs, order = segments(ctx.dims)
    acc = norms.dtype
    scale = torch.where(norms > 0, grad_out.to(acc) / norms, torch.zeros((), dtype=acc, device=x.device))
    suffix = scale[:, order].flip(1).cumsum(1).flip(1)  # [N, n_segments], sorted order
    grad = torch.zeros_like(x)
    for s, (a, b) in enumerate(segs):
        grad[:, a:b] = (x[:, a:b].to(acc) * suffix[:, s:s + 1]).to(x.dtype)
    return grad, None, None


_prefix_norms_op.register_autograd(_backward, setup_context=_setup_context)
