"""nn modules for Matryoshka Representation Learning: nested heads and their losses.

- :class:`MatryoshkaLinear`: drop-in for the paper's ``MRL_Linear_Layer`` (github.com/RAIVNLab/MRL,
  ``MRL.py``): returns a tuple of logits, one per nesting dim, and keeps the official parameter names
  (``nesting_classifier_{i}.weight`` / ``.bias``), so state dicts load both ways.
- :class:`MatryoshkaCrossEntropyLoss`: drop-in for the paper's ``Matryoshka_CE_Loss``.
- :class:`MatryoshkaLinearCrossEntropy`: a :class:`MatryoshkaLinear` head plus the fused loss
  (:func:`mrl_kernels.matryoshka_linear_cross_entropy`): features in, loss out, no logits ever built.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .ops import matryoshka_contrastive_loss, matryoshka_linear_cross_entropy
from .ops._backend import BACKENDS
from .ops._validation import (REDUCTIONS, check_choice, check_dim_weights, check_dims, check_finite, check_int)

__all__ = ["MatryoshkaLinear", "MatryoshkaCrossEntropyLoss", "MatryoshkaLinearCrossEntropy", "MatryoshkaContrastiveLoss"]


def _check_head_dims(in_features, dims) -> tuple[int, tuple[int, ...]]:
    in_features = check_int(in_features, "in_features", 1)
    dims = check_dims(dims, None)  # unique positive ints; the bound is checked below to name in_features
    if max(dims) > in_features:
        raise ValueError(f"in_features must be >= max(dims) = {max(dims)}, got {in_features}")
    return in_features, dims


class MatryoshkaLinear(nn.Module):
    """Nested linear classifier: one logits tensor per nesting dim, like the paper's ``MRL_Linear_Layer``.

    For each m_j in ``dims`` (any order; outputs follow it) the logits are
    ``x[..., :m_j] @ W_j.T + b_j`` where

    - ``shared=True`` (the paper's MRL-E, ``efficient=True``): one head ``nesting_classifier_0 =
      nn.Linear(max(dims), num_classes)`` and W_j = its first m_j columns, b_j its bias;
    - ``shared=False`` (MRL, the default as in the paper): one head ``nesting_classifier_{i} =
      nn.Linear(dims[i], num_classes)`` per dim, in the order of ``dims``.

    Parameters have the official names, so ``state_dict()`` round-trips with ``MRL_Linear_Layer(dims,
    num_classes, efficient=shared)`` (for the shared head the official width is ``nesting_list[-1]``:
    the same as ``max(dims)`` whenever the official nesting list ends with its largest dim, which its
    forward needs anyway). ``efficient`` is accepted as an alias of ``shared`` (default: False).

    ``in_features`` is the width of the input; features past ``max(dims)`` are ignored (as the official
    layer ignores them). ``x`` may have any leading dims: ``[..., in_features]``.

    Example::

        >>> head = MatryoshkaLinear(2048, 1000, dims=(8, 16, 32, 2048), efficient=True)
        >>> x, target = torch.randn(4, 2048), torch.randint(0, 1000, (4,))
        >>> logits = head(x)                              # tuple of 4 tensors, each [4, 1000]
        >>> w, b = head.weight_and_bias()                 # the layout mk.matryoshka_linear_cross_entropy takes
        >>> loss = mk.matryoshka_linear_cross_entropy(x, w, target, head.dims, bias=b)
    """

    def __init__(self, in_features: int, num_classes: int, dims: Sequence[int], shared: bool | None = None,
                 bias: bool = True, efficient: bool | None = None, device=None, dtype=None):
        super().__init__()
        in_features, dims = _check_head_dims(in_features, dims)
        num_classes = check_int(num_classes, "num_classes", 1)
        if shared is not None and efficient is not None and bool(shared) != bool(efficient):
            raise ValueError(f"efficient is an alias of shared; got shared={shared} and efficient={efficient}")
        shared = bool(shared if shared is not None else efficient if efficient is not None else False)
        self.in_features = in_features
        self.num_classes = num_classes
        self.dims = dims
        self.shared = shared
        factory = dict(bias=bool(bias), device=device, dtype=dtype)
        if shared:
            self.nesting_classifier_0 = nn.Linear(max(dims), num_classes, **factory)
        else:
            for i, m in enumerate(dims):
                setattr(self, f"nesting_classifier_{i}", nn.Linear(m, num_classes, **factory))

    # The official layer's attribute names.
    @property
    def efficient(self) -> bool:
        return self.shared

    @property
    def nesting_list(self) -> list[int]:
        return list(self.dims)

    @property
    def max_dim(self) -> int:
        return max(self.dims)

    @property
    def has_bias(self) -> bool:
        return self.nesting_classifier_0.bias is not None

    def heads(self) -> list[nn.Linear]:
        """The nn.Linear heads: one (shared) or one per dim, in the order of ``dims``."""
        return [getattr(self, f"nesting_classifier_{i}") for i in range(1 if self.shared else len(self.dims))]

    def reset_parameters(self) -> None:
        for head in self.heads():
            head.reset_parameters()

    def weight_and_bias(self):
        """``(weight, bias)`` as :func:`mrl_kernels.matryoshka_linear_cross_entropy` takes them, without
        copying: shared head -> (the [C, max(dims)] weight, its [C] bias or None); per-dim heads -> (list
        of [C, m_j] weights, list of [C] biases, or None without bias), in the order of ``dims``."""
        heads = self.heads()
        if self.shared:
            return heads[0].weight, heads[0].bias
        return [h.weight for h in heads], ([h.bias for h in heads] if self.has_bias else None)

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., {self.in_features}] (in_features), got shape {tuple(x.shape)}")

    def _logits(self, x: Tensor, j: int | None, m: int) -> Tensor:
        """Logits at dim m (the j-th head when the heads are per dim), computed as the official layer does."""
        if self.shared:
            head = self.nesting_classifier_0
            out = torch.matmul(x[..., :m], head.weight[:, :m].t())
            return out if head.bias is None else out + head.bias
        return getattr(self, f"nesting_classifier_{j}")(x[..., :m])

    def logits(self, x: Tensor, dim: int | None = None) -> Tensor:
        """Logits at one nesting dim (default: the largest). With per-dim heads ``dim`` must be one of
        ``dims``; the shared head (MRL-E) serves any ``dim`` in [1, max(dims)]."""
        self._check_input(x)
        dim = self.max_dim if dim is None else check_int(dim, "dim", 1, self.max_dim)
        if dim in self.dims:
            return self._logits(x, self.dims.index(dim), dim)
        if not self.shared:
            raise ValueError(f"dim must be one of dims {list(self.dims)} for per-dim heads, got {dim}")
        return self._logits(x, None, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Tuple of logits ``[..., num_classes]``, one per dim in the order of ``dims``."""
        self._check_input(x)
        return tuple(self._logits(x, j, m) for j, m in enumerate(self.dims))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, dims={self.dims}, "
                f"shared={self.shared}, bias={self.has_bias}")


class MatryoshkaCrossEntropyLoss(nn.Module):
    """``sum_j relative_importance[j] * CrossEntropyLoss(**kwargs)(logits[j], target)``: the paper's
    ``Matryoshka_CE_Loss``, on the tuple of logits a :class:`MatryoshkaLinear` returns.

    ``relative_importance`` (alias ``dim_weights``; pass one of them) is one finite weight per dim, by
    default all ones; its length is checked against the number of logits at each call. The other
    keyword arguments go to :class:`torch.nn.CrossEntropyLoss` (``label_smoothing``, ``ignore_index``,
    class ``weight``, ``reduction``...), held as ``self.criterion`` like the official module (so a class
    ``weight`` sits in the state dict under the same key). With ``reduction="none"`` the result is the
    [N] per-row weighted sum (the official module would mix rows and dims there).

    Example::

        >>> head = MatryoshkaLinear(64, 10, dims=(8, 16, 64))
        >>> loss_fn = MatryoshkaCrossEntropyLoss(relative_importance=[1.0, 1.0, 2.0], label_smoothing=0.1)
        >>> loss = loss_fn(head(torch.randn(32, 64)), torch.randint(0, 10, (32,)))
    """

    def __init__(self, relative_importance: Sequence[float] | None = None, *,
                 dim_weights: Sequence[float] | None = None, **cross_entropy_kwargs):
        super().__init__()
        if relative_importance is not None and dim_weights is not None:
            raise ValueError("dim_weights is an alias of relative_importance; pass only one of them")
        weights = relative_importance if relative_importance is not None else dim_weights
        name = "relative_importance" if relative_importance is not None else "dim_weights"
        if weights is not None:
            if isinstance(weights, Tensor):
                weights = weights.tolist()
            if not isinstance(weights, Sequence) or isinstance(weights, str) or len(weights) == 0:
                raise TypeError(f"{name} must be a non-empty sequence of numbers, got {weights!r}")
            weights = tuple(check_finite(w, f"{name}[{j}]") for j, w in enumerate(weights))
        self.relative_importance = weights
        self.criterion = nn.CrossEntropyLoss(**cross_entropy_kwargs)

    @property
    def dim_weights(self):
        return self.relative_importance

    def forward(self, output: Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(output, Tensor) and output.dim() < 3:
            raise TypeError("output must be a sequence of logits tensors, one per dim (as MatryoshkaLinear returns)")
        output = list(output)
        if len(output) == 0:
            raise ValueError("output is empty: expected one logits tensor per dim")
        if self.relative_importance is not None and len(self.relative_importance) != len(output):
            raise ValueError(f"relative_importance has {len(self.relative_importance)} entries but output has "
                             f"{len(output)} logits tensors (one per dim)")
        losses = torch.stack([self.criterion(logits, target) for logits in output])
        if self.relative_importance is None:
            return losses.sum(0)
        weights = torch.tensor(self.relative_importance, dtype=losses.dtype, device=losses.device)
        return (losses * weights.view(-1, *[1] * (losses.dim() - 1))).sum(0)

    def extra_repr(self) -> str:
        return f"relative_importance={self.relative_importance}"


class MatryoshkaLinearCrossEntropy(nn.Module):
    """A nested classifier head and its Matryoshka cross-entropy, fused: ``forward(features, target)``
    returns ``sum_j dim_weights[j] * CE(features[:, :m_j] @ W_j.T + b_j, target)`` through
    :func:`mrl_kernels.matryoshka_linear_cross_entropy`, without ever building the logits.

    The head is a :class:`MatryoshkaLinear` held as the submodule ``head``, so this module's state dict
    keys are the official ``MRL_Linear_Layer`` keys under the prefix ``head.``
    (``head.nesting_classifier_0.weight``, ...). ``load_mrl_linear_state_dict`` loads a state dict saved
    from the paper's ``MRL_Linear_Layer`` (or from a :class:`MatryoshkaLinear`); ``self.head`` itself is
    the drop-in layer, returning the tuple of logits. ``shared`` (alias ``efficient``) chooses the head as in
    :class:`MatryoshkaLinear`, with the same default: per-dim heads (the paper's MRL, the official layer's
    ``efficient=False``); ``shared=True`` is the paper's MRL-E head.

    ``dim_weights``, ``ignore_index``, ``label_smoothing``, ``reduction`` and ``backend`` are those of
    the fused op, fixed at construction. ``features`` are ``[..., in_features]`` with ``target`` of the
    leading shape ``[...]`` (flattened into rows; ``reduction="none"`` gives the per-row losses in that
    leading shape); features past ``max(dims)`` are ignored.

    Example::

        >>> mrl = MatryoshkaLinearCrossEntropy(2048, 1000, dims=(8, 16, 32, 2048), shared=True, label_smoothing=0.1)
        >>> features, target = torch.randn(4, 2048), torch.randint(0, 1000, (4,))
        >>> loss = mrl(features, target)                  # fused; same value as the tuple-of-logits path
        >>> loss.backward()
        >>> pred = mrl.logits(features, dim=32).argmax(1) # inference at one dim
        >>> mrl.load_mrl_linear_state_dict(official_layer.state_dict())   # an MRL_Linear_Layer(..., efficient=True)
    """

    def __init__(self, in_features: int, num_classes: int, dims: Sequence[int], shared: bool | None = None,
                 bias: bool = True, dim_weights: Sequence[float] | None = None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto",
                 efficient: bool | None = None, device=None, dtype=None):
        super().__init__()
        self.head = MatryoshkaLinear(in_features, num_classes, dims, shared=shared, bias=bias, efficient=efficient,
                                     device=device, dtype=dtype)
        self.dim_weights = None if dim_weights is None else check_dim_weights(dim_weights, len(self.head.dims))
        self.ignore_index = check_int(ignore_index, "ignore_index", -(2**63))
        self.label_smoothing = check_finite(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.backend = check_choice(backend, "backend", BACKENDS)

    @property
    def dims(self) -> tuple[int, ...]:
        return self.head.dims

    @property
    def in_features(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def shared(self) -> bool:
        return self.head.shared

    def load_mrl_linear_state_dict(self, state_dict, prefix: str = "", strict: bool = True):
        """Load the parameters of a paper's ``MRL_Linear_Layer`` (keys ``nesting_classifier_{i}.weight``
        / ``.bias``) into ``self.head``. ``prefix`` selects them from a larger checkpoint, e.g.
        ``prefix="fc."`` for a whole ResNet-50 whose ``fc`` was the MRL layer (other keys are skipped)."""
        if prefix:
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        expected = set(self.head.state_dict())
        if not expected & set(state_dict):
            raise ValueError(f"state_dict has none of the head's keys {sorted(expected)} under prefix={prefix!r}"
                             f"{_prefix_hint(state_dict, expected)}")
        return self.head.load_state_dict(state_dict, strict=strict)

    def forward(self, features: Tensor, target: Tensor, return_per_dim: bool = False):
        """The fused loss (and, with ``return_per_dim=True``, the detached per-dim losses)."""
        weight, bias = self.head.weight_and_bias()
        lead = None
        if isinstance(features, Tensor) and features.dim() >= 1:  # anything else: the op says what is wrong
            if features.shape[-1] != self.in_features:
                raise ValueError(f"features must be [..., {self.in_features}] (in_features), "
                                 f"got {tuple(features.shape)}")
            if features.dim() != 2:
                lead = features.shape[:-1]
                if not isinstance(target, Tensor) or target.shape != lead:
                    got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
                    raise ValueError(f"target must have the leading shape of features {tuple(lead)}, got {got}")
                features, target = features.reshape(-1, self.in_features), target.reshape(-1)
            if self.shared and self.in_features > self.head.max_dim:
                features = features[:, :self.head.max_dim]  # the shared weight is [C, max(dims)]: a view
        out = matryoshka_linear_cross_entropy(
            features, weight, target, self.dims, bias=bias, dim_weights=self.dim_weights,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, reduction=self.reduction,
            return_per_dim=return_per_dim, backend=self.backend)
        if lead is None or self.reduction != "none":
            return out
        if return_per_dim:
            return out[0].reshape(lead), out[1].reshape(*lead, len(self.dims))
        return out.reshape(lead)

    def logits(self, features: Tensor, dim: int | None = None) -> Tensor:
        """Logits at one dim for inference (default: the largest). ``dim`` must be one of ``dims`` for
        per-dim heads; the shared head serves any ``dim`` in [1, max(dims)]. For the logits of every dim,
        call ``self.head(features)``."""
        return self.head.logits(features, dim)

    def extra_repr(self) -> str:
        return (f"dim_weights={self.dim_weights}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, backend={self.backend!r}")


def _prefix_hint(state_dict, expected) -> str:
    """Where the head's keys sit in `state_dict` under some prefix, the prefix to pass."""
    for key in state_dict:
        for name in expected:
            if key.endswith("." + name):
                return f"; they are under prefix={key[:-len(name)]!r} (e.g. {key!r}): pass that prefix"
    return ""


class MatryoshkaContrastiveLoss(nn.Module):
    """:func:`mrl_kernels.matryoshka_contrastive_loss` as a module: in-batch InfoNCE at every nesting dim,
    ``forward(queries, docs, labels=None)``. Options are checked here, once, rather than at each call.

    Example::

        >>> loss_fn = MatryoshkaContrastiveLoss(dims=(64, 128, 256, 768), temperature=0.05, symmetric=True)
        >>> loss = loss_fn(torch.randn(64, 768), torch.randn(64, 768))
    """

    def __init__(self, dims: Sequence[int], temperature: float = 0.05, normalize: bool = True,
                 symmetric: bool = False, dim_weights: Sequence[float] | None = None, reduction: str = "mean",
                 gather: bool = False, backend: str = "auto"):
        super().__init__()
        self.dims = tuple(check_dims(dims, None))
        self.temperature = check_finite(temperature, "temperature", positive=True)
        self.dim_weights = check_dim_weights(dim_weights, len(self.dims))
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.backend = check_choice(backend, "backend", BACKENDS)
        self.normalize, self.symmetric, self.gather = bool(normalize), bool(symmetric), bool(gather)

    def forward(self, queries: Tensor, docs: Tensor, labels: Tensor | None = None) -> Tensor:
        return matryoshka_contrastive_loss(queries, docs, self.dims, temperature=self.temperature, labels=labels,
                                           normalize=self.normalize, symmetric=self.symmetric,
                                           dim_weights=self.dim_weights, reduction=self.reduction,
                                           gather=self.gather, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, temperature={self.temperature}, normalize={self.normalize}, "
                f"symmetric={self.symmetric}, reduction={self.reduction!r}, backend={self.backend!r}")
