"""mk.matryoshka_linear_cross_entropy: the sum of the cross-entropy losses of every nesting dim."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch

from .. import reference
from .._nesting import acc_dtype
from ._backend import resolve_backend
from ._validation import (REDUCTIONS, check_choice, check_dim_weights, check_dims, check_finite, check_int,
                          check_labels, check_like, check_tensor)
from .nested_ce_eager import nested_ce_eager
from .nested_ce_torch import nested_ce_backward_torch, nested_ce_forward_torch, nested_ce_with_grads_torch

IMPLEMENTED = ("triton", "torch", "eager", "reference")


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

    Under autocast the op behaves like F.linear followed by F.cross_entropy: the matmuls run in the
    autocast dtype and the loss comes out in float32; gradients reach the leaves in their own dtype.

    backend: "auto" (on the CPU: "eager" for small inputs, "torch" for the rest; on a GPU: "eager" for
    training steps whose logits fit, "triton" for the rest), "triton" (fused kernels: no logits in memory),
    "torch" (chunked fallback: memory bounded by its chunk size, one full-D matmul for all dims), "eager"
    (the per-dim loop: one linear map + F.cross_entropy per dim, autograd through torch, every dim's logits
    kept for backward; see ops/nested_ce_eager.py) or "reference" (mrl_kernels.reference, the test oracle).
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
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(features, weight, bias))
    if backend == "auto":
        backend = _auto_backend(features.device, n_rows, n_classes, dims, wants_grad)
    else:
        backend = resolve_backend("matryoshka_linear_cross_entropy", backend, features.device, IMPLEMENTED)
    if backend == "reference":
        return reference.nested_cross_entropy(features, weight if shared else list(weight), target, dims,
                                              bias=bias if bias is None or shared else list(bias),
                                              dim_weights=dim_weights, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing, reduction=reduction,
                                              return_per_dim=return_per_dim)
    if backend == "eager":
        total, per_dim = nested_ce_eager(features, weight, target, dims, bias, dim_weights, ignore_index,
                                         label_smoothing, reduction)
        return (total, per_dim.detach()) if return_per_dim else total
    device = features.device.type
    autocast = torch.is_autocast_enabled(device) and features.dtype != torch.float64
    # The loss's dtype is what F.cross_entropy gives: float32 under autocast, else the features' dtype.
    out_dtype = torch.float32 if autocast else features.dtype
    features, w, b = _fused_head(features, weight, bias, shared, autocast)
    with _without_autocast(device):
        if backend == "torch" and reduction != "none" and wants_grad:
            total, per_dim = _nested_ce_with_grads(features, w, b, target, list(dims), shared, ignore_index,
                                                   label_smoothing, list(dim_weights), reduction == "mean")
        else:
            losses = _nested_ce_rows(features, w, b, target, list(dims), shared, ignore_index, label_smoothing,
                                     backend, wants_grad)
            if reduction == "mean":
                # Like F.cross_entropy: divide by the non-ignored rows (0/0 = NaN when every row is ignored).
                per_dim = losses.sum(0) / (target != ignore_index).sum()
            else:
                per_dim = losses.sum(0) if reduction == "sum" else losses
            total = per_dim @ torch.tensor(dim_weights, dtype=per_dim.dtype, device=per_dim.device)
    total = total.to(out_dtype)
    return (total, per_dim.detach()) if return_per_dim else total


def _tensors(features, weight, bias) -> list:
    as_list = lambda t: list(t) if isinstance(t, (list, tuple)) else [t]  # noqa: E731
    return [t for t in (features, *as_list(weight), *as_list(bias)) if t is not None]


# "auto" on the CPU: the eager backend while len(dims) * N * C (the logits it keeps for backward) is at most
# this, the chunked torch fallback above. The eager backend runs a few small torch ops per dim with autograd
# through torch; the fallback pays a fixed ~0.3 ms of its own ops and dispatch per call but builds no autograd
# graph and keeps no logits, so it wins once the logits are large. On this library's 2-core CPU (fp32,
# fwd+bwd, the small-shape grid N 64..4096 x D 16..512 x C 10..1000), below 2**22 logits the eager backend
# took 0.5-0.96 of the eager loop's time from D = 128 on and within a few percent of it at D = 16 (the same
# ops: no fewer to cut there), while the fallback was up to 1.9x slower than the loop at small N; above, the
# fallback was the one that beat the loop everywhere (N = 4096, D = 16, C = 1000: 0.80 of
# the loop's time, the eager backend 1.02) (measurements: bench/NOTES.md). The bound also caps the eager
# backend's memory at about 32 MB of fp32 logits and as much of log-probabilities. Below the bound, heads of at
# most FALLBACK_MAX_CLASSES classes go to the fallback too once N * sum(dims) reaches FALLBACK_MIN_FEATURES:
# there torch's log-softmax over so few classes is slow per row and the eager backend runs it in forward and
# backward for every dim, while the fallback's time is in its matmuls (N = 4096, C = 10: 0.55-0.77 of the
# loop's time against 0.65-0.89 for the eager backend at D = 128 and 512; N = 1024, D = 512, C = 10: 0.72
# against 0.79; below N * sum(dims) = 2**20 the two were within 3%).
EAGER_CPU_LOGITS = 1 << 22
FALLBACK_MAX_CLASSES, FALLBACK_MIN_FEATURES = 16, 1 << 20
# "auto" on a GPU: training steps go to the eager loop while its per-dim logits, softmax and gradient
# (3 fp32 [N, C] per dim) take at most this: the Triton backward is still slower than the loop's cuBLAS
# matmuls where the logits fit (measurements: bench/NOTES.md). 8 GiB is a fifth of the smallest GPU the
# library targets (A100 40 GB), leaving the rest to the model. Past it, and for forward-only calls, Triton,
# which builds no logits.
EAGER_AUTO_BYTES = 8 * 2**30


def _auto_backend(device: torch.device, n_rows: int, n_classes: int, dims, wants_grad: bool) -> str:
    logits = n_rows * n_classes * len(dims)
    if device.type == "cuda":
        return "eager" if wants_grad and 3 * 4 * logits <= EAGER_AUTO_BYTES else "triton"
    small_head = n_classes <= FALLBACK_MAX_CLASSES and n_rows * sum(dims) >= FALLBACK_MIN_FEATURES
    return "eager" if logits <= EAGER_CPU_LOGITS and not small_head else "torch"


def _fused_head(features, weight, bias, shared: bool, autocast: bool):
    """The layout the fused backends take: one weight matrix (the shared head, or the per-dim heads
    concatenated along columns) and a bias of one row per head ([1, C] shared, [len(dims), C] per dim)
    or None; all cast to the autocast dtype where autocast is on, as F.linear would cast them."""
    if autocast:
        dtype = torch.get_autocast_dtype(features.device.type)
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


def _without_autocast(device_type: str):
    """The fused paths get their inputs already in the autocast dtype and accumulate in fp32 themselves:
    autocast must not re-cast their internal products (nor the backward's, wherever backward is called)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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
    with _without_autocast(x.device.type):
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
    with _without_autocast(x.device.type):
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


def _nested_ce_rows(x, w, bias, target, dims, shared, ignore_index, label_smoothing, backend, wants_grad):
    """Per-row losses [N, len(dims)]. Through the custom op where autograd or torch.compile needs it; a
    forward-only eager call runs the implementation directly (the dispatcher round trip costs more than a
    small forward)."""
    if wants_grad or torch.compiler.is_compiling():
        return _nested_ce_rows_op(x, w, bias, target, dims, shared, ignore_index, label_smoothing, backend)[0]
    return _forward(x, w, bias, target, dims, shared, ignore_index, label_smoothing, backend)[0]


@torch.library.custom_op("mrl_kernels::nested_ce_with_grads", mutates_args=())
def _nested_ce_with_grads_op(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                             dims: list[int], shared: bool, ignore_index: int, label_smoothing: float,
                             dim_weights: list[float], mean: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scalar loss whose gradients are computed in the same pass (torch fallback): (total, per-dim losses,
    dx, dw, db) for a unit upstream gradient; backward only scales them."""
    with _without_autocast(x.device.type):
        per_dim, dx, dw, db = nested_ce_with_grads_torch(x, w, bias, target, dims, shared, ignore_index,
                                                         label_smoothing, dim_weights, mean)
        total = per_dim @ torch.tensor(dim_weights, dtype=per_dim.dtype, device=per_dim.device)
    return total, per_dim, dx, dw, db


def _nested_ce_with_grads(*args):
    """(total, per-dim losses) of the op above."""
    return _nested_ce_with_grads_op(*args)[:2]


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
