"""MatryoshkaModel: a backbone that maps inputs to features, and a nested head whose fused loss trains them."""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch.nn as nn
from torch import Tensor

from ..nn import MatryoshkaLinearCrossEntropy
from ..ops._validation import check_dims, check_int

MODES = ("mrl", "mrl-e", "ff")


def check_mode_and_dims(mode: str, dims, feature_dim: int) -> tuple[str, tuple[int, ...]]:
    """The mode and its dims, checked against the backbone's feature size before anything is built: "mrl" and
    "mrl-e" take a nesting list, "ff" the one representation size d (an int or a 1-element sequence)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if mode == "ff":
        if dims is None:
            raise ValueError("dims is required for mode='ff': the representation size d (an int, e.g. dims=64)")
        if isinstance(dims, numbers.Integral) and not isinstance(dims, bool):
            dims = (int(dims),)
        dims = check_dims(dims, None)
        if len(dims) != 1:
            raise ValueError(f"mode='ff' trains one representation size: dims must be one int, got {list(dims)}")
    elif dims is None:
        raise ValueError(f"dims is required for mode={mode!r}: the nesting list")
    else:
        dims = check_dims(dims, None)
    if max(dims) > feature_dim:
        raise ValueError(f"dims must be <= the backbone's feature size {feature_dim}, got max(dims) = {max(dims)}")
    return mode, dims


class MatryoshkaModel(nn.Module):
    """A backbone and a nested classifier head trained with the fused Matryoshka cross-entropy.

    ``backbone`` (a module, or a zero-argument callable that builds it once every argument has been checked)
    maps inputs to features ``[..., feature_dim]`` (``[N, feature_dim]`` for images); ``self.head``
    is a :class:`mrl_kernels.nn.MatryoshkaLinearCrossEntropy` on them, so ``forward(x, target)`` returns the
    loss without building any logits. The mode picks the head, as in the paper (github.com/RAIVNLab/MRL):

    - ``"mrl"``: one linear head per nesting dim (``MRL_Linear_Layer(efficient=False)``);
    - ``"mrl-e"``: one shared head whose first m columns serve dim m (``MRL_Linear_Layer(efficient=True)``);
    - ``"ff"``: the fixed-feature baseline, an ordinary model of representation size d = ``dims[0]``: one
      ``Linear(d, num_classes)`` on the first d features, as the paper's ``FixedFeatureLayer`` (``MRL.py``)
      does on its 2048-d ResNet-50 output; the features past d get no gradient and are never used.

    Attributes: ``mode``, ``dims`` (a tuple in the caller's order), ``num_classes``, ``feature_dim`` (the
    backbone's width), ``embed_dim`` (= max(dims): the representation ``embed`` returns). ``head_options``
    (``dim_weights``, ``label_smoothing``, ``ignore_index``, ``reduction``, ``backend``, ``bias``) go to the
    head; the mode decides whether it is shared.
    """

    def __init__(self, backbone: nn.Module | Callable[[], nn.Module], feature_dim: int, num_classes: int, dims,
                 mode: str = "mrl", **head_options):
        super().__init__()
        feature_dim = check_int(feature_dim, "feature_dim", 1)
        mode, dims = check_mode_and_dims(mode, dims, feature_dim)
        check_head_options(head_options)
        if not callable(backbone):  # an nn.Module is callable too
            raise TypeError("backbone must be an nn.Module or a callable that builds one, "
                            f"got {type(backbone).__name__}")
        # The head first: it checks its options, so a bad one fails before a large backbone is built.
        self.head = MatryoshkaLinearCrossEntropy(feature_dim, num_classes, dims, shared=mode == "mrl-e",
                                                 **head_options)
        self.backbone = backbone if isinstance(backbone, nn.Module) else backbone()
        if not isinstance(self.backbone, nn.Module):
            raise TypeError(f"backbone() must return an nn.Module, got {type(self.backbone).__name__}")
        self.mode = mode
        self.feature_dim = feature_dim

    @property
    def dims(self) -> tuple[int, ...]:
        return self.head.dims

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def embed_dim(self) -> int:
        return max(self.head.dims)

    def features(self, x) -> Tensor:
        """The backbone's output ``[..., feature_dim]``, all of it (what the head reads)."""
        return self.backbone(x)

    def embed(self, x) -> Tensor:
        """The representation ``[..., embed_dim]``: the first max(dims) features (for ``ff``, the d features
        its head reads). A prefix ``embed(x)[..., :m]`` is the dim-m representation that retrieval and 1-NN
        use."""
        z = self.backbone(x)
        # The head ignores features past max(dims): so does the representation (a copy, so it is contiguous).
        return z if self.embed_dim == z.shape[-1] else z[..., :self.embed_dim].contiguous()

    def check_dim(self, dim) -> int:
        """A dim ``logits`` serves (default None: max(dims)), checked before the backbone runs: one of
        ``dims`` for ``mrl`` and ``ff``; any int in [1, max(dims)] for the shared head of ``mrl-e``."""
        if dim is None:
            return self.embed_dim
        dim = check_int(dim, "dim", 1, self.embed_dim)
        if self.mode != "mrl-e" and dim not in self.dims:
            raise ValueError(f"dim must be one of dims {list(self.dims)} for mode={self.mode!r}, got {dim}")
        return dim

    def logits(self, x, dim: int | None = None) -> Tensor:
        """Logits ``[..., num_classes]`` at one dim (default: the largest), for inference."""
        dim = self.check_dim(dim)
        return self.head.logits(self.backbone(x), dim)

    def forward(self, x, target: Tensor, return_per_dim: bool = False):
        """The fused loss summed over dims (and, with ``return_per_dim=True``, the detached per-dim losses),
        as :class:`mrl_kernels.nn.MatryoshkaLinearCrossEntropy` returns it for ``features(x)``."""
        return self.head(self.backbone(x), target, return_per_dim=return_per_dim)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, dims={self.dims}, num_classes={self.num_classes}, feature_dim={self.feature_dim}"


def check_head_options(head_options: dict) -> None:
    """The head's options, less those the mode decides (shared / efficient) or the model does (sizes)."""
    for name in ("shared", "efficient", "in_features", "num_classes", "dims"):
        if name in head_options:
            raise TypeError(f"{name} is not a head option here: the mode and the backbone decide it")
    allowed = {"bias", "dim_weights", "ignore_index", "label_smoothing", "reduction", "backend"}
    unknown = sorted(set(head_options) - allowed)
    if unknown:
        raise TypeError(f"unknown head option(s) {unknown}; known: {sorted(allowed)}")


def default_dims(dims, mode: str, nesting: Sequence[int]):
    """The paper's nesting list when dims is None for mrl / mrl-e (ff has no default: d is the caller's)."""
    return tuple(nesting) if dims is None and mode in ("mrl", "mrl-e") else dims
