"""Truncated-dimension search: mk.prefix_topk, mk.rerank, mk.funnel_search, mk.adaptive_search.

prefix_topk scores every database row on a prefix of its dims and keeps each query's best k; rerank
re-scores given candidate ids at a (longer) prefix; funnel_search / adaptive_search chain the two as in
the MRL paper. Every argument is checked before anything is computed. Backends: "triton" (CUDA: the
tile-maximum pass and the gather-dot re-score of kernels/prefix_topk.py; rerank and the funnel's later stages
by the same gather-dot kernel), "torch" (chunked, any device) and "reference" (mrl_kernels.reference).

metric defaults to "cosine" everywhere (these ops and MatryoshkaIndex): a prefix of an MRL embedding is
not unit-norm even where the full vector is, and prefix norms differ from row to row, so an inner
product on a prefix ranks rows partly by the norm of their prefix. Pass metric="ip" for raw inner
products (e.g. embeddings whose every prefix was trained with an inner-product loss).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import reference
from ._backend import resolve_backend
from ._validation import _holds, check_all_finite, check_choice, check_int, check_like, check_tensor
from .search_torch import prefix_topk_torch, rerank_torch

METRICS = ("ip", "cosine", "l2")
IMPLEMENTED = ("triton", "torch", "reference")
# The Triton kernels index database rows with int32 (a tile id times the tile height may run a tile past the
# end), so they take at most 2^30 rows; backend="auto" sends larger databases to the torch backend.
TRITON_MAX_ROWS = 2 ** 30


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def _check_pair(queries, database) -> int:
    """queries [Q, D] and database [N, D]: 2-D float, same dtype and device, non-empty. Returns D."""
    check_tensor(queries, "queries", ndim=2)
    check_tensor(database, "database", ndim=2)
    check_like(database, "database", queries, "queries")
    full_dim = database.shape[1]
    if queries.shape[1] != full_dim:
        raise ValueError(f"queries must be [Q, {full_dim}] like database, got {tuple(queries.shape)}")
    return full_dim


def _check_queries_finite(queries) -> None:
    """check_all_finite(queries, "queries"), screened by one sum: a NaN or Inf makes the sum non-finite, so a
    finite sum needs no second look. One reduction and no temporary, where isfinite().all() makes a bool
    tensor and reduces it: the difference is a sizeable part of a small search (bench/NOTES.md). A
    non-finite sum (or a finite one that overflowed) takes the exact check, which words the error."""
    if torch.compiler.is_compiling() or not math.isfinite(queries.sum().item()):
        check_all_finite(queries, "queries")


def _check_dim(dim, name: str, full_dim: int) -> int:
    return full_dim if dim is None else check_int(dim, name, 1, full_dim)


def _check_candidates(candidates, queries, n_rows: int) -> torch.Tensor:
    """candidates [Q, S] int64 or int32 ids in [0, n_rows); returned as int64 (the ids rerank returns)."""
    check_tensor(candidates, "candidates", ndim=2, dtypes=(torch.int64, torch.int32))
    if candidates.shape[0] != queries.shape[0]:
        raise ValueError(f"candidates must be [Q, S] with Q = {queries.shape[0]} (one row per query), "
                         f"got {tuple(candidates.shape)}")
    check_like(candidates, "candidates", queries, "queries", dtype=False)
    valid = (candidates >= 0) & (candidates < n_rows)
    if not _holds(valid.all(), f"candidates has ids outside [0, {n_rows})"):
        raise ValueError(f"candidates has id {candidates[~valid][0].item()} outside [0, {n_rows})")
    return candidates.long()


def check_funnel(k: int, dims, shortlists, full_dim: int, n_rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """funnel_search's dims and shortlists (k already checked), also MatryoshkaIndex.funnel_search's."""
    if isinstance(dims, torch.Tensor):
        dims = dims.tolist()
    if isinstance(shortlists, torch.Tensor):
        shortlists = shortlists.tolist()
    if not isinstance(dims, Sequence) or isinstance(dims, str) or len(dims) == 0:
        raise TypeError(f"dims must be a non-empty sequence of ints, got {dims!r}")
    dims = tuple(check_int(m, f"dims[{j}]", 1, full_dim) for j, m in enumerate(dims))
    if any(b < a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"dims must be non-decreasing (each stage re-ranks on at least as many dims), "
                         f"got {list(dims)}")
    if not isinstance(shortlists, Sequence) or isinstance(shortlists, str):
        raise TypeError(f"shortlists must be a sequence of ints, got {shortlists!r}")
    if len(shortlists) != len(dims) - 1:
        raise ValueError(f"shortlists must have len(dims) - 1 = {len(dims) - 1} entries (the last stage "
                         f"keeps k), got {len(shortlists)}")
    shortlists = tuple(check_int(s, f"shortlists[{j}]", k, n_rows) for j, s in enumerate(shortlists))
    if any(b > a for a, b in zip(shortlists, shortlists[1:])):
        raise ValueError(f"shortlists must be non-increasing, got {list(shortlists)}")
    return dims, shortlists


def check_adaptive(k: int, shortlist, shortlist_dim, rerank_dim, full_dim: int, n_rows: int) -> tuple[int, int, int]:
    """adaptive_search's (shortlist, shortlist_dim, rerank_dim) (k already checked), rerank_dim None = D;
    also MatryoshkaIndex.adaptive_search's."""
    shortlist = check_int(shortlist, "shortlist", k, n_rows)
    shortlist_dim = check_int(shortlist_dim, "shortlist_dim", 1, full_dim)
    rerank_dim = _check_dim(rerank_dim, "rerank_dim", full_dim)
    if rerank_dim < shortlist_dim:
        raise ValueError(f"rerank_dim must be >= shortlist_dim ({shortlist_dim}), got {rerank_dim}")
    return shortlist, shortlist_dim, rerank_dim


def search_backend(op: str, backend, device, n_rows: int) -> str:
    chosen = resolve_backend(op, backend, device, IMPLEMENTED)
    if chosen == "triton" and n_rows > TRITON_MAX_ROWS:
        if backend == "auto":
            return "torch"
        raise ValueError(f"{op}: backend='triton' takes at most {TRITON_MAX_ROWS} database rows (int32 row "
                         f"indices), got {n_rows}; use backend='torch' or 'auto', or shard the database")
    return chosen


# ----------------------------------------------------------------------------------------------
# Backend dispatch (inputs already validated)
# ----------------------------------------------------------------------------------------------

def _prefix_topk(queries, database, k: int, dim: int, metric: str, backend: str):
    if backend == "triton":
        from ..kernels.prefix_topk import prefix_topk_triton

        # The kernel takes a row stride but assumes adjacent columns; a column slice keeps that.
        db = database if database.stride(1) == 1 else database.contiguous()
        q = queries if queries.stride(1) == 1 else queries.contiguous()
        return prefix_topk_triton(q, db, k, dim, metric)
    if backend == "torch":
        return prefix_topk_torch(queries, database, k, dim, metric)
    return reference.prefix_topk(queries, database, k, dim=dim, metric=metric)


def _rerank(queries, database, candidates, k: int, dim: int, metric: str, backend: str):
    if backend == "triton":
        from ..kernels.prefix_topk import rerank_triton

        db = database if database.stride(1) == 1 else database.contiguous()
        return rerank_triton(queries, db, candidates, k, dim, metric)
    if backend == "reference":
        return reference.rerank(queries, database, candidates, k, dim=dim, metric=metric)
    return rerank_torch(queries, database, candidates, k, dim, metric)


def run_funnel(topk, rerank, k: int, dims, shortlists):
    """The funnel's stages: topk(keep, dim) -> (scores, ids) over every row, then rerank(ids, keep, dim) at
    each next dim; the stages keep shortlists[0], shortlists[1], ..., k. (MatryoshkaIndex passes its own
    storage-aware stages.)"""
    keep = list(shortlists) + [k]
    scores, ids = topk(keep[0], dims[0])
    for d, s in zip(dims[1:], keep[1:]):
        scores, ids = rerank(ids, s, d)
    return scores, ids


def _funnel(queries, database, k: int, dims, shortlists, metric: str, backend: str):
    return run_funnel(lambda s, d: _prefix_topk(queries, database, s, d, metric, backend),
                      lambda ids, s, d: _rerank(queries, database, ids, s, d, metric, backend),
                      k, dims, shortlists)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def prefix_topk(queries, database, k, dim=None, metric="cosine", backend="auto"):
    """The k best database rows for each query, scored on the first `dim` dims (all D when None).

    metric: "cosine" (the default: each prefix re-normalised, see the module docstring for why), "ip"
    (inner product) or "l2" (squared euclidean distance). Returns (scores [Q, k], ids [Q, k] int64),
    best first: descending scores for ip and cosine, ascending distances for l2. The triton and torch
    backends return fp32 scores for fp16/bf16/fp32 inputs (fp64 for fp64); the reference returns the
    input dtype.

    backend: "auto" (Triton on CUDA, the chunked torch fallback elsewhere), "triton", "torch" or
    "reference". The torch backend holds the Q x N score matrix only when it is small (at most
    search_torch.DIRECT_BYTES, where one matmul and one top-k are fastest), else works in bounded blocks.

    Queries must be finite. Database rows are not scanned (that would be a second pass over the
    prefix; MatryoshkaIndex.add refuses non-finite vectors): a row with a NaN in its prefix scores NaN
    and ranks first for every metric and backend, so it shows up instead of being silently dropped.
    Inputs may require grad; the triton and torch backends return scores without a gradient.
    """
    full_dim = _check_pair(queries, database)
    k = check_int(k, "k", 1, database.shape[0])
    dim = _check_dim(dim, "dim", full_dim)
    check_choice(metric, "metric", METRICS)
    queries = queries if dim == full_dim else queries[:, :dim]  # sliced once (every backend reads dim dims)
    _check_queries_finite(queries)
    backend = search_backend("prefix_topk", backend, queries.device, database.shape[0])
    return _prefix_topk(queries, database, k, dim, metric, backend)


def rerank(queries, database, candidates, k, dim=None, metric="cosine", backend="auto"):
    """Re-score each query's candidate database ids (candidates [Q, S] int64 or int32, e.g. prefix_topk's
    ids) on the first `dim` dims (all D when None) and keep the best k <= S. metric: as prefix_topk
    ("cosine" by default).

    Returns (scores [Q, k], database ids [Q, k] int64), best first. backend: "auto" (Triton on CUDA, else
    torch), "triton" (the gather-dot kernel: each candidate row read once in the storage dtype, fp32 sums;
    equal scores in ascending id), "torch" (batched gather + batched dot, chunked over queries) or "reference".
    """
    full_dim = _check_pair(queries, database)
    candidates = _check_candidates(candidates, queries, database.shape[0])
    k = check_int(k, "k", 1, candidates.shape[1])
    dim = _check_dim(dim, "dim", full_dim)
    check_choice(metric, "metric", METRICS)
    _check_queries_finite(queries[:, :dim])
    backend = search_backend("rerank", backend, queries.device, database.shape[0])
    return _rerank(queries, database, candidates, k, dim, metric, backend)


def funnel_search(queries, database, k, dims, shortlists, metric="cosine", backend="auto"):
    """The MRL paper's funnel retrieval: keep shortlists[0] rows at dims[0] over the whole database,
    re-rank at each next dim keeping the next shortlist size, and keep k at dims[-1].

    dims: non-decreasing ints in [1, D], e.g. (8, 16, 32, 64, 128, 2048); shortlists: len(dims) - 1
    non-increasing ints in [k, N], e.g. (200, 100, 50, 25, 10). Returns (scores [Q, k], ids [Q, k]).
    metric: as prefix_topk ("cosine" by default: each stage's prefix re-normalised).
    backend: "auto", "triton" (the Triton top-k, then the gather-dot re-rank), "torch" or "reference".
    """
    full_dim = _check_pair(queries, database)
    k = check_int(k, "k", 1, database.shape[0])
    dims, shortlists = check_funnel(k, dims, shortlists, full_dim, database.shape[0])
    check_choice(metric, "metric", METRICS)
    _check_queries_finite(queries[:, :max(dims)])
    backend = search_backend("funnel_search", backend, queries.device, database.shape[0])
    if backend == "reference":
        return reference.funnel_search(queries, database, k, dims, shortlists, metric=metric)
    return _funnel(queries, database, k, dims, shortlists, metric, backend)


def adaptive_search(queries, database, k, shortlist=200, shortlist_dim=16, rerank_dim=None, metric="cosine",
                    backend="auto"):
    """The MRL paper's adaptive retrieval: keep `shortlist` rows at `shortlist_dim` dims, re-rank them at
    `rerank_dim` (all D when None) and keep k. A two-stage funnel_search.

    Needs k <= shortlist <= N and 1 <= shortlist_dim <= rerank_dim <= D. Returns (scores [Q, k],
    ids [Q, k]). metric: as prefix_topk ("cosine" by default). backend: as funnel_search.
    """
    full_dim = _check_pair(queries, database)
    n_rows = database.shape[0]
    k = check_int(k, "k", 1, n_rows)
    shortlist, shortlist_dim, rerank_dim = check_adaptive(k, shortlist, shortlist_dim, rerank_dim, full_dim, n_rows)
    check_choice(metric, "metric", METRICS)
    _check_queries_finite(queries[:, :rerank_dim])
    backend = search_backend("adaptive_search", backend, queries.device, database.shape[0])
    if backend == "reference":
        return reference.adaptive_search(queries, database, k, shortlist, shortlist_dim, rerank_dim, metric)
    return _funnel(queries, database, k, (shortlist_dim, rerank_dim), (shortlist,), metric, backend)
