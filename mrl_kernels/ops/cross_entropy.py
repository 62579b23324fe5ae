"""mk.matryoshka_linear_cross_entropy: the sum of the cross-entropy losses of every nesting dim."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .. import reference
from ._backend import resolve_backend
from .nested_ce_torch import (acc_dtype, nested_ce_backward_torch, nested_ce_forward_torch,
                              nested_ce_with_grads_torch)
from ._validation import (REDUCTIONS, check_choice, check_dim_weights, check_dims, check_finite, check_int,
                          check_labels, check_like, check_tensor)

IMPLEMENTED = ("triton", "torch", "reference")


def matryoshka_linear_cross_entropy(features, weight, target, dims, bias=None, dim_weights=None,
                                    ignore_index=-100, label_smoothing=0.0, reduction="mean",
                                    return_per_dim=False, backend="auto"):
    """sum_j dim_weights[j] * cross_entropy(features[:, :m_j] @ W_j^T + b_j, target) over m_j in `dims`.

    features: [N, D]. weight: one [C, D] tensor shared by every dim (MRL-E: W_j = weight[:, :m_j]) or a
    sequence of [C, m_j] tensors, one per dim (MRL). bias: None, a [C] tensor (shared head) or a
    sequence of [C] tensors / None (one per dim). Each CE_j is reduced like
    torch.nn.functional.cross_entropy (mean over rows whose target is not `ignore_index`, with
    `label_smoothing`); reduction="none" gives the [N] per-row weighted sums. With return_per_dim=True
    the result is (loss, per_dim): the detached, unweighted per-dim losses ([len(dims)], or
    [N, len(dims)] for reduction="none") in the order of `dims`.
    """
    check_tensor(features, "features", ndim=2)
    n_rows, full_dim = features.shape
    dims = check_dims(dims, full_dim)
    shared = isinstance(weight, torch.Tensor)
    n_classes = _check_weight(weight, features, dims)
    _check_bias(bias, shared, features, n_classes, len(dims))
    ignore_index = check_int(ignore_index, "ignore_index", -(2**63))
    target = check_labels(target, "target", n_rows, n_classes, features, "features", ignore_index)
    dim_weights = check_dim_weights(dim_weights, len(dims))
    label_smoothing = check_finite(label_smoothing, "label_smoothing", low=0.0, high=1.0)
    check_choice(reduction, "reduction", REDUCTIONS)
    requested = backend
    backend = resolve_backend("matryoshka_linear_cross_entropy", backend, features.device, IMPLEMENTED)
    if requested == "auto" and backend == "triton":
        backend = _auto_cuda_backend(features, weight, target, dims, bias)
    if backend == "reference":
        return reference.nested_cross_entropy(features, weight if shared else list(weight), target, dims,
                                              bias=bias if bias is None or shared else list(bias),
                                              dim_weights=dim_weights, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, reduction=reduction,
                                              return_per_dim=return_per_dim)
    features, w, b = _fused_head(features, weight, bias, dims, shared)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (features, w, b))
    if backend == "torch" and reduction != "none" and wants_grad:
        total, per_dim = _nested_ce_with_grads_op(features, w, b, target, list(dims), shared, ignore_index,
                                                  label_smoothing, list(dim_weights), reduction == "mean")[:2]
        total = total.to(features.dtype)
        return (total, per_dim) if return_per_dim else total
    losses = _nested_ce_rows(features, w, b, target, list(dims), shared, ignore_index, label_smoothing, backend)
    if reduction == "mean":
        # Like F.cross_entropy: divide by the non-ignored rows (0/0 = NaN when every row is ignored).
        per_dim = losses.sum(0) / (target != ignore_index).sum()
    else:
        per_dim = losses.sum(0) if reduction == "sum" else losses
    total = per_dim @ torch.tensor(dim_weights, dtype=per_dim.dtype, device=per_dim.device)
    total = total.to(features.dtype)
    return (total, per_dim.detach()) if return_per_dim else total


# Above this the eager loop's per-dim logits (with their softmax and gradient, fp32) are not worth holding.
EAGER_AUTO_BYTES = 8 * 2**30


def _auto_cuda_backend(features, weight, target, dims, bias) -> str:
    """What "auto" runs on a GPU, from the H200 measurements in bench/results/nvidia-h200*/nested_ce.md:
    the Triton forward builds no logits and beats the eager loop from C = 21,841 up, but the Triton backward
    is still 5-8x slower than the eager loop's. So training steps that fit go to the eager loop, the rest
    (forward only, or logits too large to hold) to Triton."""
    as_list = lambda t: list(t) if isinstance(t, (list, tuple)) else [t]  # noqa: E731
    params = [t for t in (features, *as_list(weight), *as_list(bias)) if t is not None]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    n_classes = weight.shape[0] if isinstance(weight, torch.Tensor) else weight[0].shape[0]
    eager_bytes = 3 * 4 * features.shape[0] * n_classes * len(dims)
    return "reference" if wants_grad and eager_bytes <= EAGER_AUTO_BYTES else "triton"


def _fused_head(features, weight, bias, dims, shared):
    """The layout the fused backends take: one weight matrix (the shared head, or the per-dim heads
    concatenated along columns) and a bias of one row per head ([1, C] shared, [len(dims), C] per dim)
    or None; all cast to the autocast dtype where autocast is on, as F.linear would be."""
    device = features.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        cast = lambda t: t.to(dtype)  # noqa: E731
    else:
        cast = lambda t: t  # noqa: E731
    if shared:
        return cast(features), cast(weight), None if bias is None else cast(bias)[None]
    w = torch.cat([cast(h) for h in weight], dim=1)
    if bias is None or all(b is None for b in bias):
        return cast(features), w, None
    rows = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else cast(b) for b in bias]
    return cast(features), w, torch.stack(rows)


def _check_weight(weight, features, dims) -> int:
    """Returns the number of classes."""
    if isinstance(weight, torch.Tensor):
        check_tensor(weight, "weight", ndim=2)
        check_like(weight, "weight", features, "features")
        if weight.shape[1] != features.shape[1]:
            raise ValueError(f"weight must be [C, {features.shape[1]}] (features are {features.shape[1]}-D), "
                             f"got {tuple(weight.shape)}")
        return weight.shape[0]
    if not isinstance(weight, Sequence) or len(weight) != len(dims):
        raise TypeError(f"weight must be a [C, D] tensor or a sequence of {len(dims)} [C, m] tensors (one per dim)")
    for j, (w, m) in enumerate(zip(weight, dims)):
        check_tensor(w, f"weight[{j}]", ndim=2)
        check_like(w, f"weight[{j}]", features, "features")
        if w.shape != (weight[0].shape[0], m):
            raise ValueError(f"weight[{j}] must be [{weight[0].shape[0]}, {m}] for dims[{j}]={m}, "
                             f"got {tuple(w.shape)}")
    return weight[0].shape[0]


def _check_bias(bias, shared: bool, features, n_classes: int, n_dims: int) -> None:
    if bias is None:
        return
    if shared or isinstance(bias, torch.Tensor):
        if not shared:
            raise TypeError(f"bias must be None or a sequence of {n_dims} [C] tensors when weight is a sequence")
        biases = {"bias": bias}
    else:
        if not isinstance(bias, Sequence) or len(bias) != n_dims:
            raise TypeError(f"bias must be None or a sequence of {n_dims} [C] tensors (or None), one per dim")
        biases = {f"bias[{j}]": b for j, b in enumerate(bias) if b is not None}
    for name, b in biases.items():
        check_tensor(b, name, ndim=1)
        check_like(b, name, features, "features")
        if b.shape[0] != n_classes:
            raise ValueError(f"{name} must have shape [{n_classes}], got {tuple(b.shape)}")


def _forward(x, w, bias, target, dims, shared, ignore_index, label_smoothing, backend):
    if backend == "triton":
        from ..kernels.nested_ce_forward import nested_ce_forward_triton

        return nested_ce_forward_triton(x, w, bias, target, dims, shared, ignore_index, label_smoothing)
    return nested_ce_forward_torch(x, w, bias, target, dims, shared, ignore_index, label_smoothing)


@torch.library.custom_op("mrl_kernels::nested_ce_rows", mutates_args=())
def _nested_ce_rows_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                       dims: list[int], shared: bool, ignore_index: int, label_smoothing: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and LSEs [N, len(dims)] (fp32; fp64 for fp64 inputs). The LSEs are saved for backward."""
    return _forward(x, w, bias, target, dims, shared, ignore_index, label_smoothing, backend)


@_nested_ce_rows_op.register_fake
def _(x, w, bias, target, dims, shared, ignore_index, label_smoothing, backend):
    out = x.new_empty((x.shape[0], len(dims)), dtype=acc_dtype(x.dtype))
    return out, torch.empty_like(out)


@torch.library.custom_op("mrl_kernels::nested_ce_backward", mutates_args=())
def _nested_ce_backward_op(grad_losses: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                           bias: Optional[torch.Tensor], target: torch.Tensor, lse: torch.Tensor, dims: list[int],
                           shared: bool, ignore_index: int, label_smoothing: float,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db); db is empty when there is no bias."""
    args = (grad_losses, x, w, bias, target, lse, dims, shared, ignore_index, label_smoothing)
    if backend == "triton":
        from ..kernels.nested_ce_backward import nested_ce_backward_triton

        return nested_ce_backward_triton(*args)
    return nested_ce_backward_torch(*args)


@_nested_ce_backward_op.register_fake
def _(grad_losses, x, w, bias, target, lse, dims, shared, ignore_index, label_smoothing, backend):
    return torch.empty_like(x), torch.empty_like(w), x.new_empty(0) if bias is None else torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, w, bias, target, dims, shared, ignore_index, label_smoothing, backend = inputs
    ctx.save_for_backward(x, w, bias, target, output[1])
    ctx.options = (dims, shared, ignore_index, label_smoothing, backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_losses, _grad_lse):
    x, w, bias, target, lse = ctx.saved_tensors
    dx, dw, db = _nested_ce_backward_op(grad_losses.contiguous(), x, w, bias, target, lse, *ctx.options)
    return dx, dw, db if bias is not None else None, None, None, None, None, None, None


_nested_ce_rows_op.register_autograd(_backward, setup_context=_setup_context)


def _nested_ce_rows(x, w, bias, target, dims, shared, ignore_index, label_smoothing, backend):
    return _nested_ce_rows_op(x, w, bias, target, dims, shared, ignore_index, label_smoothing, backend)[0]


@torch.library.custom_op("mrl_kernels::nested_ce_with_grads", mutates_args=())
def _nested_ce_with_grads_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                             dims: list[int], shared: bool, ignore_index: int, label_smoothing: float,
                             dim_weights: list[float], mean: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scalar loss whose gradients are computed in the same pass (torch fallback): (total, per-dim losses,
    dx, dw, db) for a unit upstream gradient; backward only scales them."""
    per_dim, dx, dw, db = nested_ce_with_grads_torch(x, w, bias, target, dims, shared, ignore_index,
                                                     label_smoothing, dim_weights, mean)
    return per_dim @ torch.tensor(dim_weights, dtype=per_dim.dtype, device=per_dim.device), per_dim, dx, dw, db


@_nested_ce_with_grads_op.register_fake
def _(x, w, bias, target, dims, shared, ignore_index, label_smoothing, dim_weights, mean):
    acc = acc_dtype(x.dtype)
    return (x.new_empty((), dtype=acc), x.new_empty(len(dims), dtype=acc), torch.empty_like(x), torch.empty_like(w),
            x.new_empty(0) if bias is None else torch.empty_like(bias))


def _setup_with_grads(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.consumed = False
    ctx.save_for_backward(*output[2:])
    ctx.mark_non_differentiable(*output[1:])


def _backward_with_grads(ctx, grad_total, *_):
    # The gradients are scaled in place: a second copy of dx and dW would double this path's peak memory.
    # So they can serve one backward only (a second one, after retain_graph=True, would see scaled values).
    if ctx.consumed:
        raise RuntimeError("matryoshka_linear_cross_entropy(backend='torch'): a second backward through the same "
                           "graph is not supported; use backend='reference' for that")
    ctx.consumed = True
    dx, dw, db = ctx.saved_tensors
    return dx.mul_(grad_total), dw.mul_(grad_total), db.mul_(grad_total) if ctx.has_bias else None, *(None,) * 7


_nested_ce_with_grads_op.register_autograd(_backward_with_grads, setup_context=_setup_with_grads)
