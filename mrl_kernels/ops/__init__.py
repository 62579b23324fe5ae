"""Drop-in ops: input validation, autograd, torch.library registration and backend dispatch."""
from .contrastive import matryoshka_contrastive_loss
from .nested_ce import matryoshka_linear_cross_entropy
from .prefix_norms import prefix_norms
from .search import adaptive_search, funnel_search, prefix_topk, rerank

__all__ = [
    "adaptive_search",
    "funnel_search",
    "matryoshka_contrastive_loss",
    "matryoshka_linear_cross_entropy",
    "prefix_norms",
    "prefix_topk",
    "rerank",
]
