"""Truncated-dimension search: mk.prefix_topk, mk.rerank, mk.funnel_search, mk.adaptive_search.

prefix_topk scores every database row on a prefix of its dims and keeps each query's best k; rerank
re-scores given candidate ids at a (longer) prefix; funnel_search / adaptive_search chain the two as in
the MRL paper. Every argument is checked before anything is computed. Backends: "triton" (the fused
top-k kernel, CUDA), "torch" (chunked, any device) and "reference" (mrl_kernels.reference). The
re-ranking stages have no Triton kernel: with backend="triton" the funnel's first stage runs the Triton
top-k and the re-ranking stages run the torch backend.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import reference
from ._backend import resolve_backend
from ._validation import _holds, check_all_finite, check_choice, check_int, check_like, check_tensor
from .search_torch import prefix_topk_torch, rerank_torch

METRICS = ("ip", "cosine", "l2")
IMPLEMENTED = ("triton", "torch", "reference")
# The Triton top-k indexes database rows with int32 (a split's last tile may run up to a split past the
# end), so it takes at most 2^30 rows; backend="auto" sends larger databases to the torch backend.
TRITON_MAX_ROWS = 2 ** 30
RERANK_IMPLEMENTED = ("torch", "reference")


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


def _check_dim(dim, name: str, full_dim: int) -> int:
    return full_dim if dim is None else check_int(dim, name, 1, full_dim)


def _check_candidates(candidates, queries, n_rows: int) -> None:
    check_tensor(candidates, "candidates", ndim=2, dtypes=(torch.int64,))
    if candidates.shape[0] != queries.shape[0]:
        raise ValueError(f"candidates must be [Q, S] with Q = {queries.shape[0]} (one row per query), "
                         f"got {tuple(candidates.shape)}")
    check_like(candidates, "candidates", queries, "queries", dtype=False)
    valid = (candidates >= 0) & (candidates < n_rows)
    if not _holds(valid.all(), f"candidates has ids outside [0, {n_rows})"):
        raise ValueError(f"candidates has id {candidates[~valid][0].item()} outside [0, {n_rows})")


def _check_funnel(k: int, dims, shortlists, full_dim: int, n_rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
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


def _search_backend(op: str, backend, device, n_rows: int) -> str:
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
    if backend == "reference":
        return reference.rerank(queries, database, candidates, k, dim=dim, metric=metric)
    return rerank_torch(queries, database, candidates, k, dim, metric)  # torch (also for triton funnels)


def _funnel(queries, database, k: int, dims, shortlists, metric: str, backend: str):
    keep = list(shortlists) + [k]
    scores, ids = _prefix_topk(queries, database, keep[0], dims[0], metric, backend)
    for d, s in zip(dims[1:], keep[1:]):
        scores, ids = _rerank(queries, database, ids, s, d, metric, backend)
    return scores, ids


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def prefix_topk(queries, database, k, dim=None, metric="ip", backend="auto"):
    """The k best database rows for each query, scored on the first `dim` dims (all D when None).

    metric: "ip" (inner product), "cosine" (each prefix re-normalised) or "l2" (squared euclidean
    distance). Returns (scores [Q, k], ids [Q, k] int64), best first: descending scores for ip and
    cosine, ascending distances for l2. The triton and torch backends return fp32 scores for
    fp16/bf16/fp32 inputs (fp64 for fp64); the reference returns the input dtype.

    backend: "auto" (Triton on CUDA, the chunked torch fallback elsewhere), "triton", "torch" or
    "reference". The torch backend never holds the Q x N score matrix (see search_torch).

    Queries must be finite. Database rows are not scanned (that would be a second pass over the
    prefix; MatryoshkaIndex.add refuses non-finite vectors): a row with a NaN in its prefix scores NaN
    and ranks first for every metric and backend, so it shows up instead of being silently dropped.
    Inputs may require grad; the triton and torch backends return scores without a gradient.
    """
    full_dim = _check_pair(queries, database)
    k = check_int(k, "k", 1, database.shape[0])
    dim = _check_dim(dim, "dim", full_dim)
    check_choice(metric, "metric", METRICS)
    check_all_finite(queries[:, :dim], "queries")
    backend = _search_backend("prefix_topk", backend, queries.device, database.shape[0])
    return _prefix_topk(queries, database, k, dim, metric, backend)


def rerank(queries, database, candidates, k, dim=None, metric="ip", backend="auto"):
    """Re-score each query's candidate database ids (candidates [Q, S] int64, e.g. prefix_topk's ids)
    on the first `dim` dims (all D when None) and keep the best k <= S.

    Returns (scores [Q, k], database ids [Q, k] int64), best first. backend: "auto" / "torch" (batched
    gather + batched dot, chunked over queries) or "reference".
    """
    full_dim = _check_pair(queries, database)
    _check_candidates(candidates, queries, database.shape[0])
    k = check_int(k, "k", 1, candidates.shape[1])
    dim = _check_dim(dim, "dim", full_dim)
    check_choice(metric, "metric", METRICS)
    check_all_finite(queries[:, :dim], "queries")
    backend = resolve_backend("rerank", backend, queries.device, RERANK_IMPLEMENTED)
    return _rerank(queries, database, candidates, k, dim, metric, backend)


def funnel_search(queries, database, k, dims, shortlists, metric="ip", backend="auto"):
    """The MRL paper's funnel retrieval: keep shortlists[0] rows at dims[0] over the whole database,
    re-rank at each next dim keeping the next shortlist size, and keep k at dims[-1].

    dims: non-decreasing ints in [1, D], e.g. (8, 16, 32, 64, 128, 2048); shortlists: len(dims) - 1
    non-increasing ints in [k, N], e.g. (200, 100, 50, 25, 10). Returns (scores [Q, k], ids [Q, k]).
    backend: "auto", "triton" (Triton first stage, torch re-ranking), "torch" or "reference".
    """
    full_dim = _check_pair(queries, database)
    k = check_int(k, "k", 1, database.shape[0])
    dims, shortlists = _check_funnel(k, dims, shortlists, full_dim, database.shape[0])
    check_choice(metric, "metric", METRICS)
    check_all_finite(queries[:, :max(dims)], "queries")
    backend = _search_backend("funnel_search", backend, queries.device, database.shape[0])
    if backend == "reference":
        return reference.funnel_search(queries, database, k, dims, shortlists, metric=metric)
    return _funnel(queries, database, k, dims, shortlists, metric, backend)


def adaptive_search(queries, database, k, shortlist=200, shortlist_dim=16, rerank_dim=None, metric="ip",
                    backend="auto"):
    """The MRL paper's adaptive retrieval: keep `shortlist` rows at `shortlist_dim` dims, re-rank them at
    `rerank_dim` (all D when None) and keep k. A two-stage funnel_search.

    Needs k <= shortlist <= N and 1 <= shortlist_dim <= rerank_dim <= D. Returns (scores [Q, k],
    ids [Q, k]). backend: as funnel_search.
    """
    full_dim = _check_pair(queries, database)
    n_rows = database.shape[0]
    k = check_int(k, "k", 1, n_rows)
    shortlist = check_int(shortlist, "shortlist", k, n_rows)
    shortlist_dim = check_int(shortlist_dim, "shortlist_dim", 1, full_dim)
    rerank_dim = _check_dim(rerank_dim, "rerank_dim", full_dim)
    if rerank_dim < shortlist_dim:
        raise ValueError(f"rerank_dim must be >= shortlist_dim ({shortlist_dim}), got {rerank_dim}")
    check_choice(metric, "metric", METRICS)
    check_all_finite(queries[:, :rerank_dim], "queries")
    backend = _search_backend("adaptive_search", backend, queries.device, database.shape[0])
    if backend == "reference":
        return reference.adaptive_search(queries, database, k, shortlist, shortlist_dim, rerank_dim, metric)
    return _funnel(queries, database, k, (shortlist_dim, rerank_dim), (shortlist,), metric, backend)
