"""Torch fallback for truncated-dimension search (any device, any float dtype).

prefix_topk_torch never forms the Q x N score matrix: queries go in batches and database rows in
chunks sized from SCORE_CHUNK_BYTES; each chunk's scores are reduced to their best k at once and
merged with the running best (cat + topk). The prefix is read as the strided view database[:, :dim]
(no copy of the database); 16-bit rows are upcast to fp32 one chunk at a time. rerank_torch gathers
the candidate rows at `dim` dims for a batch of queries at a time and scores them with one batched
matmul. Nothing here validates its inputs (mrl_kernels.ops.search does).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Budget for the per-step temporaries (a score chunk, a fp32 copy of a database chunk, a batch of
# gathered candidate rows). The running best and the outputs ([Q, k]) are on top of it.
SCORE_CHUNK_BYTES = 64 << 20
_EPS = 1e-12  # F.normalize's eps: a zero row scores 0
LONG_ROW_K, LONG_ROWS = 32, 131072  # k above which score rows are made at least LONG_ROWS long


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are fp64 for fp64 inputs, fp32 otherwise (16-bit inputs accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def blocks(n_queries: int, n_rows: int, dim: int, k: int, elem_bytes: int) -> tuple[int, int]:
    """(query batch, row chunk) such that the score chunk (qb * nc elements) and the upcast database
    chunk (nc * dim elements) each fit in half of SCORE_CHUNK_BYTES, and the running best / merge
    buffers (qb * 2k elements plus int64 ids) stay within a few times the budget."""
    budget = max(2, SCORE_CHUNK_BYTES // elem_bytes)  # elements
    half = budget // 2
    if k > LONG_ROW_K:
        # torch.topk's cost per row grows with k, so for large k rows of scores are made long (fewer
        # queries per batch): on the 2-core CPU, k=200 at d=16 went from 0.90 s to 0.29 s for 1000 x 200k.
        nc = max(1, min(n_rows, max(half // n_queries, LONG_ROWS), half // dim))
        return max(1, min(n_queries, half // nc, budget // (4 * k))), nc
    # Small k: all queries of a batch share each database chunk, read once per batch.
    qb = max(1, min(n_queries, math.isqrt(half), budget // (4 * k)))
    nc = max(1, min(n_rows, half // qb, half // dim))
    return qb, nc


def _largest(metric: str) -> bool:
    return metric != "l2"


def _merge(best_s: Tensor | None, best_i: Tensor | None, s: Tensor, i: Tensor, k: int, largest: bool):
    if best_s is not None:
        s, i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
    if s.shape[1] > k:
        s, pos = torch.topk(s, k, dim=1, largest=largest, sorted=False)
        i = i.gather(1, pos)
    return s, i


def _sort(s: Tensor, i: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    s, pos = torch.sort(s, dim=1, descending=largest, stable=True)
    return s, i.gather(1, pos)


def prefix_topk_torch(queries: Tensor, database: Tensor, k: int, dim: int, metric: str) -> tuple[Tensor, Tensor]:
    """Exact top-k of each query over all database rows on the first `dim` dims, best first:
    (scores [Q, k] fp32 (fp64 for fp64 inputs), ids [Q, k] int64)."""
    acc = acc_dtype(database.dtype)
    n_q, n = queries.shape[0], database.shape[0]
    largest = _largest(metric)
    qb, nc = blocks(n_q, n, dim, k, torch.finfo(acc).bits // 8)
    prefix = database[:, :dim]  # strided view, no copy
    out_s = torch.empty((n_q, k), dtype=acc, device=queries.device)
    out_i = torch.empty((n_q, k), dtype=torch.int64, device=queries.device)
    for q0 in range(0, n_q, qb):
        q = queries[q0:q0 + qb, :dim].to(acc)
        if metric == "cosine":
            q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(_EPS)
        sq_q = q.square().sum(1, keepdim=True) if metric == "l2" else None
        best_s = best_i = None
        for r0 in range(0, n, nc):
            x = prefix[r0:r0 + nc].to(acc)  # a copy only for 16-bit storage (one chunk)
            s = q @ x.T  # [qb, nc]
            if metric == "cosine":
                s.div_(torch.linalg.vector_norm(x, dim=1).clamp_min(_EPS))
            elif metric == "l2":
                s.mul_(-2).add_(sq_q).add_(x.square().sum(1)).clamp_min_(0)
            kc = min(k, s.shape[1])
            if kc < s.shape[1]:
                s, pos = torch.topk(s, kc, dim=1, largest=largest, sorted=False)
                ids = pos + r0
            else:
                ids = torch.arange(r0, r0 + s.shape[1], device=s.device).expand(s.shape[0], -1)
            best_s, best_i = _merge(best_s, best_i, s, ids, k, largest)
        out_s[q0:q0 + qb], out_i[q0:q0 + qb] = _sort(best_s, best_i, largest)
    return out_s, out_i


def rerank_torch(queries: Tensor, database: Tensor, candidates: Tensor, k: int, dim: int,
                 metric: str) -> tuple[Tensor, Tensor]:
    """Re-score each query's candidate ids [Q, S] on the first `dim` dims and keep the best k:
    (scores [Q, k] fp32 (fp64 for fp64 inputs), database ids [Q, k] int64), best first."""
    acc = acc_dtype(database.dtype)
    n_q, n_cand = candidates.shape
    largest = _largest(metric)
    budget = max(1, SCORE_CHUNK_BYTES // (torch.finfo(acc).bits // 8))
    qb = max(1, min(n_q, budget // (n_cand * dim)))  # gathered rows: qb * S * dim elements
    prefix = database[:, :dim]
    out_s = torch.empty((n_q, k), dtype=acc, device=queries.device)
    out_i = torch.empty((n_q, k), dtype=torch.int64, device=queries.device)
    for q0 in range(0, n_q, qb):
        cand = candidates[q0:q0 + qb]
        q = queries[q0:q0 + qb, :dim].to(acc)
        x = prefix[cand].to(acc)  # [qb, S, dim]
        if metric == "cosine":
            q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(_EPS)
        s = torch.bmm(x, q.unsqueeze(2)).squeeze(2)  # [qb, S]
        if metric == "cosine":
            s.div_(torch.linalg.vector_norm(x, dim=2).clamp_min(_EPS))
        elif metric == "l2":
            s.mul_(-2).add_(q.square().sum(1, keepdim=True)).add_(x.square().sum(2)).clamp_min_(0)
        best, pos = torch.topk(s, k, dim=1, largest=largest, sorted=True)
        out_s[q0:q0 + qb], out_i[q0:q0 + qb] = best, cand.gather(1, pos)
    return out_s, out_i
