"""Eager PyTorch reference implementations with the exact semantics of the MRL paper.

These functions are the test oracle and the benchmark baseline ("the eager loop") for the whole
library, so they are written to be obviously right rather than fast: one Python loop over the
nesting dims, one matmul / logits matrix / loss per dim, all kept for autograd, exactly as in

- the official MRL code (Kusupati et al., NeurIPS 2022, arXiv 2205.13147,
  github.com/RAIVNLab/MRL): ``MRL_Linear_Layer`` returns one logits tensor per nesting dim m,
  either from a separate head ``nn.Linear(m, C)`` per dim (MRL) or from the first m columns of one
  shared ``nn.Linear(D, C)`` (MRL-E, ``efficient=True``); ``Matryoshka_CE_Loss`` sums
  ``relative_importance[j] * CrossEntropyLoss(logits_j, target)`` over the dims;
- sentence-transformers: ``MatryoshkaLoss`` truncates both embeddings to each dim and sums the
  weighted inner loss; ``MultipleNegativesRankingLoss`` is in-batch InfoNCE (cosine similarity
  times a scale = 1 / temperature, cross-entropy against the paired document, the other documents
  and any extra hard negatives act as negatives); ``MultipleNegativesSymmetricRankingLoss`` / CLIP
  average that with the document-to-query direction;
- the paper's adaptive retrieval: shortlist with a short prefix, re-rank with a longer one
  ("funnel": several re-ranking stages with growing dims and shrinking shortlists).

Nothing here validates its inputs (the ops layer does that before calling in), and everything runs
in whatever dtype it is given (the tests use float64). ``dims`` may be in any order; per-dim outputs
follow the caller's order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "nested_logits",
    "nested_cross_entropy",
    "nested_contrastive_loss",
    "prefix_norms",
    "prefix_scores",
    "prefix_topk",
    "rerank",
    "funnel_search",
    "adaptive_search",
]


# ----------------------------------------------------------------------------------------------
# Training: nested heads and losses
# ----------------------------------------------------------------------------------------------

def _head(weight, bias, j: int, m: int) -> tuple[Tensor, Tensor | None]:
    """The (weight, bias) that produce the logits of dim j (of size m).

    One [C, D] tensor is the shared MRL-E head: its first m columns. A sequence is the MRL head:
    one [C, m_j] tensor (and one bias or None) per dim.
    """
    if isinstance(weight, Tensor):
        return weight[:, :m], bias
    return weight[j], (None if bias is None else bias[j])


def _combine(losses: list[Tensor], dim_weights, return_per_dim: bool):
    """total = sum_j dim_weights[j] * losses[j]; optionally also the detached unweighted losses.

    ``losses`` are already reduced: scalars ("mean"/"sum") or [N] vectors ("none"), so per_dim is
    [len(dims)] or [N, len(dims)].
    """
    weights = [1.0] * len(losses) if dim_weights is None else [float(w) for w in dim_weights]
    total = sum(w * loss for w, loss in zip(weights, losses))
    if return_per_dim:
        return total, torch.stack(losses, dim=-1).detach()
    return total


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    """Reduce a per-row loss vector like torch's losses do (without ignored rows)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss  # "none"


def nested_logits(features: Tensor, weight, dims: Sequence[int], bias=None) -> tuple[Tensor, ...]:
    """The paper's MRL_Linear_Layer: ``logits_j = features[:, :m_j] @ W_j.T + b_j``, one per dim.

    ``weight``: one [C, D] tensor (shared head, MRL-E: W_j = weight[:, :m_j], ``bias`` a [C] tensor
    or None) or a sequence of [C, m_j] tensors (MRL; ``bias`` None or a sequence of [C]/None).
    """
    logits = []
    for j, m in enumerate(dims):
        w, b = _head(weight, bias, j, m)
        logits.append(F.linear(features[:, :m], w, b))
    return tuple(logits)


def nested_cross_entropy(features: Tensor, weight, target: Tensor, dims: Sequence[int], bias=None,
                         dim_weights=None, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", return_per_dim: bool = False):
    """The paper's Matryoshka_CE_Loss on MRL_Linear_Layer logits.

    total = sum_j dim_weights[j] * F.cross_entropy(logits_j, target, ...), each CE reduced like
    torch ("mean" over non-ignored rows, NaN when every row is ignored; "sum"; "none" -> [N] with
    ignored rows 0, so the total is the [N] per-row weighted sum). ``dim_weights`` defaults to ones.
    ``return_per_dim=True`` returns ``(total, per_dim)`` with the detached, unweighted per-dim
    losses: [len(dims)] for "mean"/"sum", [N, len(dims)] for "none".
    """
    losses = [
        F.cross_entropy(z, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                        reduction=reduction)
        for z in nested_logits(features, weight, dims, bias)
    ]
    return _combine(losses, dim_weights, return_per_dim)


def nested_contrastive_loss(queries: Tensor, docs: Tensor, dims: Sequence[int],
                            temperature: float = 0.05, labels: Tensor | None = None,
                            normalize: bool = True, symmetric: bool = False, dim_weights=None,
                            reduction: str = "mean", return_per_dim: bool = False):
    """MatryoshkaLoss over (Multiple Negatives / symmetric) in-batch InfoNCE.

    queries [B, D], docs [M, D] with M >= B (docs past the first B are extra negatives), labels [B]
    (default arange(B)): query i's positive is doc labels[i]. Per dim m, on the m-prefixes
    (each L2-normalised when ``normalize``: per-prefix cosine), scores = q @ d.T / temperature and
    loss_m[i] = CE(scores[i], labels[i]). ``symmetric`` averages that with the doc-to-query CE:
    the column of doc labels[i] over the B queries, target i. Reduction over queries ("mean",
    "sum", "none" -> [B]), dim_weights and return_per_dim as in :func:`nested_cross_entropy`.
    """
    B = queries.shape[0]
    if labels is None:
        labels = torch.arange(B, device=queries.device)
    rows = torch.arange(B, device=queries.device)
    losses = []
    for m in dims:
        q, d = queries[:, :m], docs[:, :m]
        if normalize:
            q, d = F.normalize(q, dim=1), F.normalize(d, dim=1)
        scores = q @ d.T / temperature                                   # [B, M]
        loss = F.cross_entropy(scores, labels, reduction="none")         # query -> doc
        if symmetric:
            loss = (loss + F.cross_entropy(scores[:, labels].T, rows, reduction="none")) / 2
        losses.append(_reduce(loss, reduction))
    return _combine(losses, dim_weights, return_per_dim)


def prefix_norms(x: Tensor, dims: Sequence[int]) -> Tensor:
    """[N, len(dims)]: the L2 norm of x[:, :m] for each m in dims (caller's order)."""
    return torch.stack([torch.linalg.vector_norm(x[:, :m], dim=1) for m in dims], dim=1)


# ----------------------------------------------------------------------------------------------
# Serving: truncated-dimension search
# ----------------------------------------------------------------------------------------------

def _pairwise(q: Tensor, x: Tensor, metric: str) -> Tensor:
    """Scores of rows q [..., Q, d] against rows x [..., N, d] -> [..., Q, N].

    "ip": inner product; "cosine": inner product of L2-normalised rows (a zero row scores 0);
    "l2": squared euclidean distance |q|^2 + |x|^2 - 2 q.x, clamped at 0 (as faiss IndexFlatL2).
    """
    if metric == "cosine":
        q, x = F.normalize(q, dim=-1), F.normalize(x, dim=-1)
    ip = q @ x.transpose(-1, -2)
    if metric == "l2":
        sq_q = q.square().sum(-1).unsqueeze(-1)
        sq_x = x.square().sum(-1).unsqueeze(-2)
        return (sq_q + sq_x - 2 * ip).clamp_min(0)
    return ip


def _best(scores: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """The best k entries of each row, best first: largest for ip/cosine, smallest for l2. A NaN score
    (from a NaN in a vector) ranks first for every metric, as in the kernels, so it surfaces instead of
    being dropped (torch.topk ranks NaN largest, hence the negation for l2)."""
    if metric == "l2":
        best, pos = torch.topk(scores.neg(), k, dim=1, sorted=True)
        return 0.0 - best, pos  # 0 - x: no -0.0
    return torch.topk(scores, k, dim=1, sorted=True)


def prefix_scores(queries: Tensor, database: Tensor, dim: int | None = None,
                  metric: str = "cosine") -> Tensor:
    """[Q, N] scores of every query against every database row on the first ``dim`` dims
    (None = all D). "l2" is a squared distance (smaller is better)."""
    return _pairwise(queries[:, :dim], database[:, :dim], metric)  # [:, :None] is the full row


def prefix_topk(queries: Tensor, database: Tensor, k: int, dim: int | None = None,
                metric: str = "cosine") -> tuple[Tensor, Tensor]:
    """Exact top-k on the first ``dim`` dims: (scores [Q, k], ids [Q, k] int64), best first."""
    return _best(prefix_scores(queries, database, dim, metric), k, metric)


def rerank(queries: Tensor, database: Tensor, candidates: Tensor, k: int, dim: int | None = None,
           metric: str = "cosine") -> tuple[Tensor, Tensor]:
    """Re-score candidate database ids [Q, S] on the first ``dim`` dims and keep the best k of each
    query's S: (scores [Q, k], database ids [Q, k]), best first."""
    q = queries[:, None, :dim]                                  # [Q, 1, d]
    x = database[:, :dim][candidates]                           # [Q, S, d]
    scores = _pairwise(q, x, metric)[:, 0, :]                   # [Q, S]
    best, pos = _best(scores, k, metric)
    return best, candidates.gather(1, pos)


def funnel_search(queries: Tensor, database: Tensor, k: int, dims: Sequence[int],
                  shortlists: Sequence[int], metric: str = "cosine") -> tuple[Tensor, Tensor]:
    """The paper's funnel retrieval: shortlist shortlists[0] rows at dims[0] over the whole database,
    then re-rank at each next dim keeping the next shortlist size, and k at dims[-1].

    E.g. dims (8, 16, 32, 64, 128, 2048) with shortlists (200, 100, 50, 25, 10).
    """
    keep = list(shortlists) + [k]
    scores, ids = prefix_topk(queries, database, keep[0], dims[0], metric)
    for d, s in zip(dims[1:], keep[1:]):
        scores, ids = rerank(queries, database, ids, s, d, metric)
    return scores, ids


def adaptive_search(queries: Tensor, database: Tensor, k: int, shortlist: int = 200,
                    shortlist_dim: int = 16, rerank_dim: int | None = None,
                    metric: str = "cosine") -> tuple[Tensor, Tensor]:
    """The paper's adaptive retrieval: shortlist at ``shortlist_dim`` dims, re-rank at
    ``rerank_dim`` (None = all D) and keep k. A two-stage :func:`funnel_search`."""
    rerank_dim = database.shape[1] if rerank_dim is None else rerank_dim
    return funnel_search(queries, database, k, (shortlist_dim, rerank_dim), (shortlist,), metric)
