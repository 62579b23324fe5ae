"""mk.matryoshka_linear_cross_entropy: the sum of the cross-entropy losses of every nesting dim."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import reference
from ._backend import resolve_backend
from ._validation import (REDUCTIONS, check_choice, check_dim_weights, check_dims, check_finite, check_int,
                          check_labels, check_like, check_tensor)

IMPLEMENTED = ("reference",)


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
    backend = resolve_backend("matryoshka_linear_cross_entropy", backend, features.device, IMPLEMENTED)
    return reference.nested_cross_entropy(features, weight if shared else list(weight), target, dims,
                                          bias=bias if bias is None or shared else list(bias),
                                          dim_weights=dim_weights, ignore_index=ignore_index,
                                          label_smoothing=label_smoothing, reduction=reduction,
                                          return_per_dim=return_per_dim)


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
