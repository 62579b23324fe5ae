"""Evaluation of nested representations: the MRL paper's per-dim metrics.

Every function follows the paper's public code (github.com/RAIVNLab/MRL) and says where it differs:

- :func:`nested_accuracy`, :func:`linear_top1`: top-1 of the linear heads at each nesting dim (Table 1).
- :func:`knn_top1`: k-NN top-1 on the prefix embeddings (the paper's "1-NN accuracy", Figure 3).
- :func:`retrieval_metrics`: mAP@k, precision@k and recall@k of class-label retrieval (Section 4.3),
  computed as the paper's ``retrieval/compute_metrics.ipynb`` does.
- :func:`adaptive_classification`: the confidence-threshold cascade over the dims (Section 5.1).
- :func:`adaptive_retrieval`, :func:`funnel_retrieval`: the paper's adaptive and funnel retrieval through
  :class:`~mrl_kernels.MatryoshkaIndex`, with recall against exact full-dim search and MFLOPs per query
  (Section 5.2).

Neighbours are found as the paper does: it L2-normalises each prefix and searches with FAISS
``IndexFlatL2``; on unit vectors the L2 distance ranks rows exactly as cosine similarity does, so the
searches here run :func:`mrl_kernels.prefix_topk` with ``metric="cosine"`` (the prefix is re-normalised
at each dim). Exact score ties are broken by the search op, in no documented order (FAISS does the
same). Queries are assumed to be a different set from the database (the paper queries the validation
set against the training set): a query that is also in the database retrieves itself.

Argument errors (TypeError / ValueError naming the argument) are raised before any search runs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .index import MatryoshkaIndex
from .index.fileformat import DTYPE_NAMES
from .ops import prefix_topk
from .ops._validation import (check_all_finite, check_choice, check_dims, check_finite, check_int, check_labels,
                              check_like, check_tensor)
from .ops.search import METRICS, check_adaptive, check_funnel
from .reference import nested_logits

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# adaptive_classification's default thresholds: 0, 0.05, ..., 1 plus 0.99 and 0.999. A trained model's max
# softmax probability piles up just below 1, where a coarse grid would jump straight to the largest dim.
DEFAULT_THRESHOLDS = tuple(sorted({i / 20 for i in range(21)} | {0.99, 0.999}))
# funnel_retrieval's default first shortlist, halved at each stage: the paper's funnel (200, 100, 50, 25, 10).
_FUNNEL_SHORTLIST = 200
_FUNNEL_FIRST_DIM = 16


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def _check_pair(queries, q_name: str, database, db_name: str) -> None:
    """Two finite 2-D float tensors of the same width, dtype and device. The database is scanned too: the
    search ops would rank a NaN row first (see prefix_topk), which a metric would count silently."""
    for t, name in ((queries, q_name), (database, db_name)):
        check_tensor(t, name, ndim=2)
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"{q_name} has {queries.shape[1]} dims but {db_name} has {database.shape[1]}")
    check_like(queries, q_name, database, db_name)
    for t, name in ((queries, q_name), (database, db_name)):
        check_all_finite(t, name)


def _check_class_ids(labels, name: str, n: int, device) -> Tensor:
    """Class ids of any integer values (retrieval compares them for equality only): 1-D, n long; moved to
    `device` (labels usually live on the CPU while embeddings are on the GPU)."""
    check_tensor(labels, name, ndim=1, dtypes=_INT_DTYPES)
    if labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one label per embedding), got {tuple(labels.shape)}")
    return labels.to(device=device, dtype=torch.int64)


def _check_logits_by_dim(logits_by_dim, target) -> tuple[tuple[int, ...], Tensor]:
    """The dims of a {dim: [N, C] logits} dict (in its order) and the target as int64 class indices."""
    if not isinstance(logits_by_dim, Mapping) or len(logits_by_dim) == 0:
        raise TypeError(f"logits_by_dim must be a non-empty dict {{dim: [N, C] logits}}, got "
                        f"{type(logits_by_dim).__name__}")
    dims = check_dims(list(logits_by_dim), None, "logits_by_dim keys")
    first = None
    for m, logits in logits_by_dim.items():
        name = f"logits_by_dim[{m}]"
        check_tensor(logits, name, ndim=2)
        if first is None:
            first = (name, logits)
        elif logits.shape != first[1].shape:
            raise ValueError(f"{name} has shape {tuple(logits.shape)} but {first[0]} has {tuple(first[1].shape)}")
        else:
            check_like(logits, name, first[1], first[0], dtype=False)
    n, n_classes = first[1].shape
    return dims, check_labels(target, "target", n, n_classes, first[1], first[0])


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def nested_accuracy(features, weight, target, dims, bias=None) -> list[float]:
    """Top-1 accuracy of the classifier at each nesting dim (linear classification, the paper's Table 1),
    in the order of `dims`. weight: one shared [C, D] head (MRL-E) or one [C, m] head per dim (MRL), as
    :func:`mrl_kernels.reference.nested_logits` takes them."""
    return [(logits.argmax(1) == target).float().mean().item()
            for logits in nested_logits(features, weight, dims, bias)]


@torch.no_grad()
def linear_top1(logits_by_dim: dict[int, Tensor], target: Tensor) -> dict[int, float]:
    """Top-1 accuracy of each trained head: {dim: fraction of rows whose argmax is the target}, in the
    dict's order. logits_by_dim: {dim: [N, C] logits}, e.g. ``{m: model.logits(x, m) for m in dims}``;
    target: [N] class indices in [0, C)."""
    dims, target = _check_logits_by_dim(logits_by_dim, target)
    return {m: (logits_by_dim[m].argmax(1) == target).double().mean().item() for m in dims}


@torch.no_grad()
def adaptive_classification(logits_by_dim: dict[int, Tensor], target, thresholds=None) -> list[dict]:
    """The paper's adaptive classification: a cascade over the dims in ascending order that stops at the
    first dim whose max softmax probability is >= the threshold (the largest dim answers when none is
    that confident).

    Returns one entry per threshold, in the given order: ``{"threshold": t, "expected_dim": the mean dim
    used per example, "accuracy": top-1 of the cascade}``. thresholds: reals in [0, 1] (default
    :data:`DEFAULT_THRESHOLDS`); t = 0 answers every example at the smallest dim, t = 1 (nearly) always
    at the largest, and the sweep between traces the accuracy-vs-expected-dim curve of the paper's Fig. 6.

    How the paper differs (``model_analysis/Model_Cascades.ipynb``): it learns one threshold per pair of
    consecutive dims by a grid search (``linspace(0.1, 1, 100)``, the smallest threshold with the best
    two-model accuracy) on 10,000 held-out validation images with test-time augmentation, stops when the
    confidence is strictly greater than the threshold, traces its curve by capping the largest dim of the
    cascade, and averages over 30 random held-out splits. Here one shared threshold is swept over a
    grid on the data given (no held-out split): the simple cascade, which needs no tuning data.
    """
    dims, target = _check_logits_by_dim(logits_by_dim, target)
    if thresholds is None:
        thresholds = DEFAULT_THRESHOLDS
    if isinstance(thresholds, Tensor):
        thresholds = thresholds.tolist()
    if not isinstance(thresholds, Sequence) or isinstance(thresholds, str) or len(thresholds) == 0:
        raise TypeError(f"thresholds must be a non-empty sequence of reals in [0, 1], got {thresholds!r}")
    thresholds = [check_finite(t, f"thresholds[{j}]", low=0.0, high=1.0) for j, t in enumerate(thresholds)]

    ascending = sorted(dims)
    # [L, N] confidence (max softmax probability) and correctness per dim, one dim at a time: stacking the
    # logits would hold L x N x C values (1.8 GB for ImageNet's 50,000 x 1,000 at 9 dims).
    confidence, correct = [], []
    for m in ascending:
        logits = logits_by_dim[m]
        conf, pred = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1).max(-1)
        confidence.append(conf)
        correct.append(pred == target)
    confidence, correct = torch.stack(confidence), torch.stack(correct)
    dim_values = torch.tensor(ascending, dtype=torch.float64, device=target.device)
    rows = torch.arange(target.shape[0], device=target.device)
    out = []
    for t in thresholds:
        stop = confidence >= t
        stop[-1] = True  # the largest dim answers whatever its confidence
        level = stop.int().argmax(0)  # the first dim confident enough (argmax returns the first maximum)
        out.append({"threshold": t, "expected_dim": dim_values[level].mean().item(),
                    "accuracy": correct[level, rows].double().mean().item()})
    return out


# ----------------------------------------------------------------------------------------------
# k-NN and retrieval on prefix embeddings
# ----------------------------------------------------------------------------------------------

def _neighbour_labels(queries: Tensor, database: Tensor, db_labels: Tensor, k: int, dim: int) -> Tensor:
    """[Q, k] labels of each query's k nearest database rows on the first `dim` dims, nearest first.
    prefix_topk never forms the whole [Q, N] score matrix of a large search (it scores bounded blocks
    and merges their top-k), so a 10,000 x 60,000 search fits in a few hundred MB."""
    _, ids = prefix_topk(queries, database, k, dim=dim, metric="cosine")
    return db_labels[ids]


def _majority_vote(neighbours: Tensor) -> Tensor:
    """[Q] the most frequent label of each row of [Q, k] labels (nearest first); a tie goes to the tied
    label whose nearest neighbour ranks first, so k = 2 and any tie fall back to the nearer neighbour."""
    if neighbours.shape[1] == 1:
        return neighbours[:, 0]
    # votes[q, j]: how many of row q's neighbours share neighbour j's label; argmax takes the first maximum,
    # i.e. the nearest neighbour of a most-voted label. [Q, k, k] bools: k is small (tens at most).
    votes = (neighbours[:, :, None] == neighbours[:, None, :]).sum(-1)
    return neighbours.gather(1, votes.argmax(1, keepdim=True)).squeeze(1)


@torch.no_grad()
def knn_top1(train_emb, train_labels, test_emb, test_labels, dims, k=1) -> dict[int, float]:
    """k-NN top-1 accuracy of the prefix embeddings: {dim: accuracy} in the order of `dims`.

    For each dim d, each test row is classified by its k nearest training rows on the first d dims
    (cosine similarity, i.e. L2 distance between L2-normalised prefixes, as the paper's FAISS search);
    k = 1 is the paper's 1-NN accuracy. For k > 1 the neighbours vote with equal weight and a tie goes to
    the tied class whose nearest member is nearest (the paper reports only 1-NN).

    train_emb [N, D], test_emb [M, D]: float, same dtype and device; train_labels [N], test_labels [M]:
    integer class ids (any values; moved to the embeddings' device). dims: unique ints in [1, D].
    """
    _check_pair(test_emb, "test_emb", train_emb, "train_emb")
    dims = check_dims(dims, train_emb.shape[1])
    k = check_int(k, "k", 1, train_emb.shape[0])
    train_labels = _check_class_ids(train_labels, "train_labels", train_emb.shape[0], train_emb.device)
    test_labels = _check_class_ids(test_labels, "test_labels", test_emb.shape[0], train_emb.device)
    return {m: (_majority_vote(_neighbour_labels(test_emb, train_emb, train_labels, k, m)) == test_labels)
            .double().mean().item() for m in dims}


def _class_sizes(query_labels: Tensor, db_labels: Tensor) -> Tensor:
    """[Q] how many database rows carry each query's label (0 for a label the database lacks)."""
    classes, counts = torch.unique(db_labels, return_counts=True)
    pos = torch.searchsorted(classes, query_labels).clamp_max(classes.shape[0] - 1)
    return torch.where(classes[pos] == query_labels, counts[pos], torch.zeros_like(counts[pos]))


def _ranked_metrics(neighbours: Tensor, query_labels: Tensor, class_sizes: Tensor | None = None) -> dict[str, float]:
    """The paper's metrics of ranked [Q, k] neighbour labels (``compute_mAP_recall_at_k`` in its
    ``retrieval/compute_metrics.ipynb``), averaged over the queries: "map" (AP@k: the sum of precision@i
    over the ranks i of the relevant results, divided by k), "precision" (relevant / k), "top1" (the
    first result is relevant) and, given the class sizes, "recall" (relevant / class size)."""
    k = neighbours.shape[1]
    matches = (neighbours == query_labels[:, None]).double()
    hits = matches.sum(1)
    precision_at_i = matches.cumsum(1) / torch.arange(1, k + 1, dtype=torch.float64, device=matches.device)
    out = {"map": ((precision_at_i * matches).sum(1) / k).mean().item(),
           "precision": (hits / k).mean().item(),
           "top1": matches[:, 0].mean().item()}
    if class_sizes is not None:
        # A label the database lacks has no hits either: 0 / 1 = 0 rather than 0 / 0.
        out["recall"] = (hits / class_sizes.clamp_min(1)).mean().item()
    return out


@torch.no_grad()
def retrieval_metrics(query_emb, query_labels, db_emb, db_labels, dims, k=10) -> dict[int, dict[str, float]]:
    """Class-label retrieval at each prefix dim, as the paper computes it (its
    ``retrieval/compute_metrics.ipynb``): {dim: {"map", "precision", "recall"}} at k, in the order of
    `dims`, each averaged over the queries. A database row is relevant to a query when it has the
    query's label; the k nearest rows on the first d dims are retrieved (cosine, as :func:`knn_top1`).

    - "precision": relevant rows among the k, divided by k (the usual precision@k).
    - "map": mean over queries of AP@k = (sum of precision@i over the ranks i <= k holding a relevant
      row) / k. The usual AP@k divides by the number of relevant rows retrieved (or by min(k, R)); the
      paper divides by k, so a query with one relevant row, ranked first, scores 1/k rather than 1, and
      mAP@k <= precision@k. This is the number the paper reports as mAP@k.
    - "recall": relevant rows among the k divided by the number of database rows of the query's class
      (how much of the class was found). The paper divides by a constant 1,300 (ImageNet-1K's largest
      class size in its training set, which it uses as the database); here each query's own class size
      is used, which is the same on a class-balanced database. It is not the "recall@k" of
      embedding-retrieval papers (the fraction of queries with any relevant row in the top k), and it
      is at most k / class size.
    """
    _check_pair(query_emb, "query_emb", db_emb, "db_emb")
    dims = check_dims(dims, db_emb.shape[1])
    k = check_int(k, "k", 1, db_emb.shape[0])
    query_labels = _check_class_ids(query_labels, "query_labels", query_emb.shape[0], db_emb.device)
    db_labels = _check_class_ids(db_labels, "db_labels", db_emb.shape[0], db_emb.device)
    sizes = _class_sizes(query_labels, db_labels)
    out = {}
    for m in dims:
        scores = _ranked_metrics(_neighbour_labels(query_emb, db_emb, db_labels, k, m), query_labels, sizes)
        out[m] = {key: scores[key] for key in ("map", "precision", "recall")}
    return out


# ----------------------------------------------------------------------------------------------
# Adaptive and funnel retrieval
# ----------------------------------------------------------------------------------------------

def search_mflops(n_rows: int, dims: Sequence[int], shortlists: Sequence[int]) -> float:
    """Millions of multiply-adds per query of a funnel search over `n_rows` database rows: the first stage
    scores every row at dims[0], stage i re-scores shortlists[i - 1] rows at dims[i]:

        MFLOPs = (n_rows * dims[0] + sum_i shortlists[i - 1] * dims[i]) / 1e6.

    This is the paper's count (MFLOPs / query, one multiply-add per dim per scored row; top-k selection
    and normalisation are not counted): exact search is n_rows * D, e.g. 1.28M x 2048 = 2.6k MFLOPs on
    ImageNet-1K, and adaptive retrieval 16 -> 2048 with a 200-row shortlist costs 1.28M x 16 + 200 x 2048,
    about 1/125 of it (the paper quotes 128x: 2048 / 16, the ratio of the first stage alone). Adaptive retrieval is
    dims (Ds, Dr), shortlists (shortlist,); exact search at d dims is dims (d,), shortlists ().
    """
    return (n_rows * dims[0] + sum(s * m for s, m in zip(shortlists, dims[1:]))) / 1e6


def _retrieval_setup(query_emb, db_emb, k, query_labels, db_labels, metric):
    """Checks the arguments common to adaptive_retrieval and funnel_retrieval; returns (k, labels)."""
    _check_pair(query_emb, "query_emb", db_emb, "db_emb")
    k = check_int(k, "k", 1, db_emb.shape[0])
    check_choice(metric, "metric", METRICS)
    if (query_labels is None) != (db_labels is None):
        raise ValueError("pass both query_labels and db_labels (for mAP@k), or neither")
    labels = None
    if query_labels is not None:
        labels = (_check_class_ids(query_labels, "query_labels", query_emb.shape[0], db_emb.device),
                  _check_class_ids(db_labels, "db_labels", db_emb.shape[0], db_emb.device))
    return k, labels


@torch.no_grad()
def _funnel_report(query_emb, db_emb, k, dims, shortlists, labels, metric) -> dict:
    """Runs the funnel (dims, shortlists) and the exact full-dim search through one MatryoshkaIndex and
    scores the funnel against it (arguments already checked)."""
    n_rows, full_dim = db_emb.shape
    # The index stores float32 unless the embeddings are already in a 16-bit dtype it supports (it has no
    # float64): both searches read the same stored vectors, so recall measures the funnel alone.
    dtype = db_emb.dtype if db_emb.dtype in DTYPE_NAMES else torch.float32
    index = MatryoshkaIndex(metric=metric, dtype=dtype, device=db_emb.device)
    index.add(db_emb)
    _, ids = index.funnel_search(query_emb, k, dims, shortlists)
    _, exact = index.search(query_emb, k)
    # recall@k against exact search: the share of the exact top k that the funnel also returns (rows tied
    # with the exact k-th at the boundary may be swapped for it, which counts as a miss).
    found = (ids[:, :, None] == exact[:, None, :]).any(1).double()
    mflops, mflops_exact = search_mflops(n_rows, dims, shortlists), search_mflops(n_rows, (full_dim,), ())
    report = {"dims": tuple(dims), "shortlists": tuple(shortlists), "k": k, "recall": found.mean().item(),
              "mflops": mflops, "mflops_exact": mflops_exact, "speedup": mflops_exact / mflops}
    if labels is not None:
        query_labels, db_labels = labels
        for suffix, found_ids in (("", ids), ("_exact", exact)):
            scores = _ranked_metrics(db_labels[found_ids], query_labels)
            report.update({f"{key}{suffix}": value for key, value in scores.items()})
    return report


_REPORT_DOC = """
    Returns a dict: "dims" and "shortlists" (the funnel run), "k", "recall" (recall@k against exact
    search on all D dims: the mean share of each query's exact top k that the search also returns; 1.0
    means full-dim quality), "mflops" (per query, see :func:`search_mflops`), "mflops_exact" (exact
    full-dim search, n_rows * D / 1e6) and "speedup" (their ratio); with labels also "map", "precision"
    and "top1" at k (the paper's definitions, see :func:`retrieval_metrics`; "top1" is the 1-NN accuracy
    the paper reports beside mAP@10) and the same of exact full-dim search as "map_exact",
    "precision_exact", "top1_exact". The database is stored in a MatryoshkaIndex (float32, or the
    embeddings' own 16-bit dtype) on db_emb's device; metric: as the index ("cosine", the paper's L2 on
    normalised prefixes)."""


def adaptive_retrieval(query_emb, db_emb, shortlist_dim=16, rerank_dim=None, shortlist=200, k=10,
                       query_labels=None, db_labels=None, metric="cosine") -> dict:
    """The paper's adaptive retrieval through :meth:`MatryoshkaIndex.adaptive_search`: shortlist
    `shortlist` rows on the first `shortlist_dim` dims, re-rank them on `rerank_dim` (None = D), keep k.
    query_emb [Q, D], db_emb [N, D]: float, same dtype and device; query_labels [Q], db_labels [N]:
    optional integer class ids (both or neither).
    """
    k, labels = _retrieval_setup(query_emb, db_emb, k, query_labels, db_labels, metric)
    shortlist, shortlist_dim, rerank_dim = check_adaptive(k, shortlist, shortlist_dim, rerank_dim,
                                                          db_emb.shape[1], db_emb.shape[0])
    return _funnel_report(query_emb, db_emb, k, (shortlist_dim, rerank_dim), (shortlist,), labels, metric)


adaptive_retrieval.__doc__ += _REPORT_DOC


def funnel_retrieval(query_emb, db_emb, dims=None, shortlists=None, k=10, query_labels=None, db_labels=None,
                     metric="cosine") -> dict:
    """The paper's funnel retrieval through :meth:`MatryoshkaIndex.funnel_search`: shortlist
    shortlists[0] rows at dims[0], re-rank at each next dim keeping the next shortlist, and k at dims[-1].

    dims: non-decreasing; default 16, 32, 64, ... (doubling while below D), then D. shortlists:
    len(dims) - 1 non-increasing sizes in [k, N]; default halving from 200 (the paper's
    (200, 100, 50, 25, 10) shape), never below k nor above N. Arguments otherwise as
    :func:`adaptive_retrieval`.
    """
    k, labels = _retrieval_setup(query_emb, db_emb, k, query_labels, db_labels, metric)
    n_rows, full_dim = db_emb.shape
    if isinstance(dims, Tensor):
        dims = dims.tolist()
    if dims is None:
        dims = [2 ** e for e in range(int(math.log2(_FUNNEL_FIRST_DIM)), full_dim.bit_length())
                if 2 ** e < full_dim] + [full_dim]
    if shortlists is None and isinstance(dims, Sequence):
        shortlists = [min(n_rows, max(k, _FUNNEL_SHORTLIST >> i)) for i in range(len(dims) - 1)]
    dims, shortlists = check_funnel(k, dims, shortlists, full_dim, n_rows)
    return _funnel_report(query_emb, db_emb, k, dims, shortlists, labels, metric)


funnel_retrieval.__doc__ += _REPORT_DOC
