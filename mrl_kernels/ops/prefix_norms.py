"""mk.prefix_norms: L2 norms of every nesting prefix of every row, in one pass."""
from __future__ import annotations

import torch

from .. import reference
from .._nesting import acc_dtype
from ._backend import resolve_backend
from ._validation import check_dims, check_tensor
from .prefix_norms_torch import (prefix_norms_backward, prefix_norms_eager, prefix_norms_running_sum,
                                 prefix_norms_torch)

IMPLEMENTED = ("triton", "cuda", "torch", "eager", "reference")
# "auto" on the CPU: the chunked fallback for wide, large inputs (x[:, :max(dims)] of at least FALLBACK_MIN_COLS
# columns and FALLBACK_MIN_ELEMENTS elements), the eager loop (one vector_norm per dim) otherwise. The fallback
# reads x[:, :max(dims)] once where the loop reads sum_j m_j columns (about twice as many for doubling dims),
# but it pays a few extra ops per call and reduces each segment separately, which is slow per element for
# narrow segments (8, 8, 16, ... columns). On this library's 2-core CPU (fp32, forward; measurements:
# bench/NOTES.md) the fallback took 0.66-0.94 of the loop's time from D = 256 and N * D = 2**20 on (0.66 at
# N = 65,536, D = 2048), and 1.03-1.28 below that or at D = 64, where the eager loop took 0.94-0.99. Both
# bound memory: vector_norm(dtype=float32) upcasts 16-bit rows on the fly, with no fp32 copy of x.
FALLBACK_MIN_COLS = 256
FALLBACK_MIN_ELEMENTS = 1 << 20
# Below both of these (x[:, :max(dims)] at most RUNNING_SUM_MAX_COLS wide and RUNNING_SUM_MAX_ELEMENTS large),
# a call that wants no gradient and has at least RUNNING_SUM_MIN_DIMS dims takes prefix_norms_running_sum: four
# ops whatever the number of dims, where the loop's two per dim (slice, norm) dominate. The bounds are where
# it stopped winning on this library's CPU: parity at N * D = 2**16 with D = 64, slower from D = 256 on, and
# no faster than the loop's five ops with two dims (measurements: bench/NOTES.md).
RUNNING_SUM_MAX_COLS = 64
RUNNING_SUM_MAX_ELEMENTS = 1 << 16
RUNNING_SUM_MIN_DIMS = 3


def prefix_norms(x: torch.Tensor, dims, backend: str = "auto") -> torch.Tensor:
    """For each row of `x` [N, D] and each m in `dims`, the L2 norm of x[:m]: a [N, len(dims)] tensor,
    columns in the order of `dims`. fp16/bf16 inputs give fp32 norms (accumulated in fp32); fp32 and
    fp64 inputs give their own dtype. Differentiable with respect to x. Under autocast the norms are
    computed as without it (norms are fp32 ops for autocast).

    backend: "auto" (Triton on CUDA tensors; on the CPU a running sum of squares for small x without gradient,
    the chunked fallback for wide, large x, else the eager loop), "triton", "cuda" (CuPy), "torch" (chunked:
    reads x once whatever the number of dims), "eager" (one torch.linalg.vector_norm per dim, autograd
    through torch) or "reference".
    """
    check_tensor(x, "x", ndim=2)
    dims = check_dims(dims, x.shape[1])
    wants_grad = x.requires_grad and torch.is_grad_enabled()
    if backend == "auto" and x.is_cpu:
        width = max(dims)
        elements = x.shape[0] * width
        if (width <= RUNNING_SUM_MAX_COLS and elements <= RUNNING_SUM_MAX_ELEMENTS and len(dims) >= RUNNING_SUM_MIN_DIMS
                and not wants_grad):
            return prefix_norms_running_sum(x, dims)
        backend = "torch" if width >= FALLBACK_MIN_COLS and elements >= FALLBACK_MIN_ELEMENTS else "eager"
    else:
        backend = resolve_backend("prefix_norms", backend, x.device, IMPLEMENTED)
    if backend == "eager":
        return prefix_norms_eager(x, dims)
    if backend == "reference":
        return reference.prefix_norms(x, dims).to(acc_dtype(x.dtype))
    if backend in ("triton", "cuda") and x.dtype == torch.float64:
        raise TypeError(f"prefix_norms: backend={backend!r} takes fp32/fp16/bf16 x, got float64; "
                        "use backend='torch'")
    if torch.compiler.is_compiling() or wants_grad:
        return _prefix_norms_op(x, list(dims), backend)  # the custom op: autograd, and opaque to the compiler
    return _run(x, dims, backend)  # no gradient wanted: no dispatcher round trip


def _run(x: torch.Tensor, dims, backend: str) -> torch.Tensor:
    if backend == "triton":
        from ..kernels.prefix_norms import prefix_norms_triton

        return prefix_norms_triton(_unit_column_stride(x), dims)
    if backend == "cuda":
        from ..cuda.prefix_norms import prefix_norms_cuda

        return prefix_norms_cuda(_unit_column_stride(x), dims)
    return prefix_norms_torch(x, dims)


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride but assume adjacent columns; a column slice like x[:, :512] keeps it.
    return x if x.stride(1) == 1 else x.contiguous()


@torch.library.custom_op("mrl_kernels::prefix_norms", mutates_args=())
def _prefix_norms_op(x: torch.Tensor, dims: list[int], backend: str) -> torch.Tensor:
    return _run(x, dims, backend)


@_prefix_norms_op.register_fake
def _(x, dims, backend):
    return x.new_empty((x.shape[0], len(dims)), dtype=acc_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    x, dims, _ = inputs
    ctx.save_for_backward(x, output)
    ctx.dims = dims


def _backward(ctx, grad_out):
    x, norms = ctx.saved_tensors
    return prefix_norms_backward(grad_out, x, norms, ctx.dims), None, None


_prefix_norms_op.register_autograd(_backward, setup_context=_setup_context)
