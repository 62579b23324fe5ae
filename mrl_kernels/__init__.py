"""mrl-kernels: fused kernels for Matryoshka Representation Learning (arXiv 2205.13147).

Public API: the losses for every nesting dim in one call, prefix norms and truncated-dim search.
`mrl_kernels.reference` holds the eager PyTorch definitions they are tested against.
"""
from . import datasets, reference
from .ops import (adaptive_search, funnel_search, matryoshka_contrastive_loss, matryoshka_linear_cross_entropy,
                  prefix_norms, prefix_topk, rerank)
from . import nn
from .index import MatryoshkaIndex

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "MatryoshkaIndex",
    "adaptive_search",
    "datasets",
    "funnel_search",
    "matryoshka_contrastive_loss",
    "matryoshka_linear_cross_entropy",
    "nn",
    "prefix_norms",
    "prefix_topk",
    "reference",
    "rerank",
]
