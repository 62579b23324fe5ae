"""Torch fallback for truncated-dimension search (any device, any float dtype).

prefix_topk_torch scores a small search whole (the Q x N score matrix within DIRECT_BYTES: one matmul and
one top-k, like the eager loop); a larger one never forms that matrix: database rows go in chunks and
queries in batches sized from SCORE_CHUNK_BYTES; each (batch, chunk) block of scores is reduced to its best k at
once and merged with the running best (cat + topk). The prefix is read from the strided view
database[:, :dim] once, a chunk at a time (no copy of the database); 16-bit rows are upcast to fp32
one chunk at a time. rerank_torch gathers the candidate rows at `dim` dims for a batch of queries at a
time and scores them against their query. A NaN score (a NaN in a vector) ranks first for every metric,
as in the Triton kernel. Nothing here validates its inputs (mrl_kernels.ops.search does).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._nesting import acc_dtype

# Budget for the per-step temporaries (a score chunk, a fp32 copy of a database chunk, a batch of
# gathered candidate rows). The running best and the outputs ([Q, k]) are on top of it. 64 MB: each step
# then scores millions of pairs, so its matmul dwarfs the step's fixed cost, while the search needs only
# this much beyond its inputs and outputs, small next to any CPU's or GPU's memory.
SCORE_CHUNK_BYTES = 64 << 20
_EPS = 1e-12  # F.normalize's eps: a zero row scores 0
# k above which score rows are made at least LONG_ROWS (2^17) long: torch.topk's cost per row grows with k,
# so for large k fewer, longer rows (each a query against 2^17 database rows) amortise it.
LONG_ROW_K, LONG_ROWS = 32, 131072
# CPU blocks: a database chunk of about CPU_BLOCK values and a score block of CPU_BLOCK scores (4 times that
# for long rows), so that both stay in the caches while a chunk is scored against every query batch:
# 2^20 fp32 values are 4 MB, the order of a server core's L2 plus its share of L3, so a chunk scored
# against query batch after query batch is re-read from cache rather than memory; much smaller blocks
# pay per-block call overhead, much larger ones stream the chunk from memory once per batch.
# Measurements: bench/NOTES.md.
CPU_BLOCK = 1 << 20
# A strided prefix is copied out before it is scored when it spans more memory than the CPU's last-level
# cache, or, for prefixes of at least CPU_COPY_ROW_BYTES per row, more than about its L2: read with a stride of
# D values from memory, torch's matmul and row norms slow down several times, the more so the longer each row's
# prefix (2 threads, fp32, D = 256, database out of cache, copy / strided: N = 100,000, d = 64: norms 2.2 vs
# 5.9 ms; N = 5,000-10,000, d = 64: 0.6-0.8x the strided search's time; d = 16: no gain). Within the cache the
# strided view is as fast and the copy is pure cost (N = 1,000, d = 64: the copy doubles an ip search).
# 32 MB: the L3 of the benchmark machine (a 2-core EPYC), also typical of a server's L3 per core complex.
# Measurements: bench/NOTES.md.
CPU_COPY_SPAN, CPU_COPY_ROW_SPAN, CPU_COPY_ROW_BYTES = 32 << 20, 4 << 20, 128

# The direct path: a search whose [Q, N] scores (and, for 16-bit storage, the fp32 copy of the [N, dim]
# prefix) take at most DIRECT_BYTES is one matmul and one top-k over the whole score matrix, as the eager
# loop does, without the chunk machinery (buffers, per-block top-k and merge, a final sort), whose fixed
# cost per call is several times a whole small search. DIRECT_BYTES is the per-step budget
# SCORE_CHUNK_BYTES: the direct path holds no more than one step of the chunked path may, and running the
# eager loop's own two ops it is as fast as that loop wherever it is taken (the chunked path is not
# always, below this size); past it the chunked path bounds memory where the eager loop's score matrix
# keeps growing, and was the faster of the two at 1000 x 100,000. Measurements: bench/NOTES.md.
DIRECT_BYTES = SCORE_CHUNK_BYTES
# grouped_topk from this k on, for rows at least this many times k (more than its group size: it needs
# k whole groups).
GROUPED_K, GROUPED_ROWS_PER_K = 64, 256


def blocks(n_queries: int, n_rows: int, dim: int, k: int, elem_bytes: int, cpu: bool = False) -> tuple[int, int]:
    """(query batch, row chunk) such that the score block (qb * nc elements) and the upcast database
    chunk (nc * dim elements) each fit in half of SCORE_CHUNK_BYTES, and the merge buffers (qb * 2k
    elements plus int64 ids) stay within a few times the budget. On the CPU, blocks are sized for its
    caches as well (see CPU_BLOCK)."""
    budget = max(2, SCORE_CHUNK_BYTES // elem_bytes)  # elements
    half = budget // 2
    fit = lambda qb, nc: (max(1, min(n_queries, qb, budget // (4 * k))),  # noqa: E731
                          max(1, min(n_rows, nc, half // dim)))
    long_rows = k > LONG_ROW_K  # torch.topk's cost per row grows with k: fewer, longer score rows
    if cpu:
        _, nc = fit(1, max(LONG_ROWS if long_rows else 1024, CPU_BLOCK // dim))
        qb, _ = fit((4 if long_rows else 1) * CPU_BLOCK // nc, 1)
        return min(qb, max(1, half // nc)), nc
    if long_rows:
        nc = max(half // n_queries, LONG_ROWS)
        _, nc = fit(1, nc)
        return fit(half // nc, nc)[0], nc
    qb, _ = fit(math.isqrt(half), 1)  # many queries share each database chunk
    return qb, fit(1, half // qb)[1]


def grouped_topk(s: Tensor, k: int, group: int = 32) -> tuple[Tensor, Tensor]:
    """torch.topk(s, k, dim=1, sorted=False) (largest, NaN first), exact, for rows much longer than k: the row
    is cut into groups of `group` values and only the k groups with the best maxima are searched. Each of the
    k best values lies in a group whose maximum is at least the k-th best value, and at most k groups have
    one, so those groups hold the whole answer (with ties, an equally good answer; a NaN makes its group's
    maximum NaN, which ranks first as the NaN itself does). One vectorised max pass plus two small top-ks cost
    less than torch.topk over the whole row for k in the hundreds."""
    n_q, n = s.shape
    whole = n - n % group
    groups = s[:, :whole].view(n_q, whole // group, group)
    _, g = torch.topk(groups.amax(2), k, dim=1, sorted=False)
    cand = groups[torch.arange(n_q, device=s.device)[:, None], g].view(n_q, k * group)
    if whole < n:  # the ragged tail joins the candidates as it is
        cand = torch.cat([cand, s[:, whole:]], dim=1)
    top, at = torch.topk(cand, k, dim=1, sorted=False)
    in_group = at < k * group
    pos = g.gather(1, (at // group).clamp_max(k - 1)) * group + at % group
    return top, torch.where(in_group, pos, at - k * group + whole)


def _unorient(s: Tensor, metric: str) -> Tensor:
    """Scores are kept larger-is-better (minus the distance for l2) so that one top-k direction serves every
    metric and a NaN ranks first everywhere (torch.topk ranks NaN largest); back to distances for l2."""
    return 0.0 - s if metric == "l2" else s  # 0 - s: no -0.0


def _prepared_queries(queries: Tensor, dim: int, acc: torch.dtype, metric: str) -> tuple[Tensor, Tensor | None]:
    """(queries' prefix in the score dtype, unit length for cosine; their squared norms [Q, 1] for l2, else
    None). A view where nothing needs changing, else one copy of the query prefix."""
    q = queries if queries.shape[1] == dim else queries[:, :dim]  # (a slice is a visible cost in a small search)
    q = q if q.dtype == acc else q.to(acc)
    if metric == "cosine":
        q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(_EPS)
    return q, q.square().sum(1, keepdim=True) if metric == "l2" else None


def _orient_(s: Tensor, metric: str, q_sq: Tensor | None, x_scale: Tensor | None) -> Tensor:
    """Turns inner products s into larger-is-better scores in place: divided by the rows' norms x_scale for
    cosine, minus the squared distance for l2 (x_scale: the rows' squared norms)."""
    if metric == "cosine":
        s.div_(x_scale)
    elif metric == "l2":
        s.mul_(2).sub_(q_sq).sub_(x_scale).clamp_max_(0)
    return s


def _row_scale(x: Tensor, metric: str, dim: int) -> Tensor | None:
    """What _orient_ needs of the database rows x (along `dim`): norms for cosine, squared norms for l2."""
    if metric == "cosine":
        return torch.linalg.vector_norm(x, dim=dim).clamp_min(_EPS)
    return x.square().sum(dim) if metric == "l2" else None


def _scaled_rows(x: Tensor, metric: str, n_queries: int, owned: bool) -> tuple[Tensor, Tensor | None]:
    """(rows to score, what _orient_ then needs of them: None when nothing). For cosine the rows' norms divide
    either the Q x N scores or, from Q >= dim / 2 on, the N x dim rows themselves (unit rows, as the eager loop
    makes them): the rows' pass is then at most twice the scores' and leaves the matmul a contiguous copy of a
    strided prefix, which paid for itself in measurements (2 threads, Q = 16, N = 10,000, d = 16 of D = 256,
    database out of cache: 0.97x the eager loop's time, against 1.18x scaling the scores; bench/NOTES.md).
    In place when x is a copy of ours."""
    x_scale = _row_scale(x, metric, 1)
    if metric == "cosine" and 2 * n_queries >= x.shape[1]:
        return (x.div_(x_scale[:, None]) if owned else x / x_scale[:, None]), None
    return x, x_scale


def _merge(best: tuple[Tensor, Tensor] | None, s: Tensor, i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The best k of the running best (None before the first chunk) and a chunk's candidates."""
    if best is not None:
        s, i = torch.cat([best[0], s], dim=1), torch.cat([best[1], i], dim=1)
    if s.shape[1] > k:
        s, pos = torch.topk(s, k, dim=1, sorted=False)
        i = i.gather(1, pos)
    return s, i


def _best_first(s: Tensor, i: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Oriented candidates (scores s, ids i) sorted best first (stable: equal scores keep their order), back
    in the metric's own direction."""
    s, pos = torch.sort(s, dim=1, descending=True, stable=True)
    return _unorient(s, metric), i.gather(1, pos)


def merge_topk(scores: Tensor, ids: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """The best k of each row of candidates (scores [Q, C] in the metric's own direction, ids [Q, C],
    C >= k), best first, NaN first: how the results of several searches (database chunks, shards) merge."""
    s, i = _merge(None, _unorient(scores, metric), ids, k)  # _unorient is its own inverse: it orients too
    return _best_first(s, i, metric)


def _copy_prefix_first(x: Tensor) -> bool:
    """Whether the direct path copies the strided CPU prefix x before scoring it (see CPU_COPY_SPAN)."""
    if not x.is_cpu or x.is_contiguous():
        return False
    span = x.shape[0] * x.stride(0) * x.element_size()
    return span > CPU_COPY_SPAN or (span > CPU_COPY_ROW_SPAN and x.shape[1] * x.element_size() >= CPU_COPY_ROW_BYTES)


def _prefix_topk_direct(queries: Tensor, database: Tensor, k: int, dim: int, metric: str) -> tuple[Tensor, Tensor]:
    """prefix_topk_torch for a small [Q, N] score matrix: scored whole (as the eager loop does), same results.
    Every Python-level step is a visible share of a small search, hence the guarded slices and casts."""
    if queries.requires_grad or database.requires_grad:  # cheaper than entering no_grad on every call
        queries, database = queries.detach(), database.detach()
    acc = acc_dtype(database.dtype)
    q, q_sq = _prepared_queries(queries, dim, acc, metric)
    x = database if database.shape[1] == dim else database[:, :dim]  # a strided view: mm reads it in place
    owned = x.dtype != acc or _copy_prefix_first(x)
    if owned:
        x = x.to(acc).contiguous()  # a new tensor either way: an upcast of 16-bit storage, or see CPU_COPY_SPAN
    x, x_scale = _scaled_rows(x, metric, q.shape[0], owned)
    s = torch.mm(q, x.T)
    if x_scale is not None:
        _orient_(s, metric, q_sq, x_scale)
    top, ids = torch.topk(s, k, dim=1, sorted=True)
    return _unorient(top, metric), ids


def prefix_topk_torch(queries: Tensor, database: Tensor, k: int, dim: int, metric: str) -> tuple[Tensor, Tensor]:
    """Exact top-k of each query over all database rows on the first `dim` dims, best first:
    (scores [Q, k] fp32 (fp64 for fp64 inputs), ids [Q, k] int64). No gradient flows to the scores.
    Up to DIRECT_BYTES the score matrix is computed whole (_prefix_topk_direct), past it in blocks
    (_prefix_topk_chunked)."""
    elem = acc_dtype(database.dtype).itemsize  # bytes of a score
    n = database.shape[0]
    upcast = database.element_size() < elem  # 16-bit storage: the direct path copies the prefix to fp32
    if elem * n * max(queries.shape[0], dim if upcast else 0) <= DIRECT_BYTES:
        return _prefix_topk_direct(queries, database, k, dim, metric)
    return _prefix_topk_chunked(queries, database, k, dim, metric)


@torch.no_grad()
def _prefix_topk_chunked(queries: Tensor, database: Tensor, k: int, dim: int, metric: str) -> tuple[Tensor, Tensor]:
    """prefix_topk_torch by blocks, never holding the [Q, N] scores.

    Database chunks are the outer loop, so the prefix is read once whatever the number of query
    batches: each chunk (unless the prefix is already contiguous in the score dtype) is gathered into a
    reused contiguous buffer (upcast for 16-bit storage) and scored against every query batch into a
    reused score buffer (a fresh multi-MB allocation per step costs the CPU more in page faults than the
    matmul itself). Queries are cast / normalised once (a copy of their prefix for cosine or 16-bit
    queries)."""
    n_q, n = queries.shape[0], database.shape[0]
    acc = acc_dtype(database.dtype)
    qb, nc = blocks(n_q, n, dim, k, torch.finfo(acc).bits // 8, cpu=queries.device.type == "cpu")
    prefix = database[:, :dim]  # strided view, no copy
    in_place = prefix.is_contiguous() and prefix.dtype == acc  # chunks are used as they are
    chunk_buf = None if in_place else torch.empty((min(nc, n), dim), dtype=acc, device=queries.device)
    score_buf = torch.empty(min(qb, n_q) * min(nc, n), dtype=acc, device=queries.device)
    queries, q_sq = _prepared_queries(queries, dim, acc, metric)  # once, not once per chunk
    best = {}  # first query of a batch -> its running best (scores, ids)
    for r0 in range(0, n, nc):
        chunk = prefix[r0:r0 + nc]
        x = chunk if in_place else chunk_buf[:chunk.shape[0]].copy_(chunk)
        x, x_scale = _scaled_rows(x, metric, n_q, owned=not in_place)
        kc = min(k, x.shape[0])
        for q0 in range(0, n_q, qb):
            q = queries[q0:q0 + qb]
            s = torch.mm(q, x.T, out=score_buf[:q.shape[0] * x.shape[0]].view(q.shape[0], x.shape[0]))
            if x_scale is not None:
                _orient_(s, metric, None if q_sq is None else q_sq[q0:q0 + qb], x_scale)
            if kc >= GROUPED_K and x.shape[0] >= GROUPED_ROWS_PER_K * kc:
                top_s, pos = grouped_topk(s, kc)
            else:
                top_s, pos = torch.topk(s, kc, dim=1, sorted=False)
            best[q0] = _merge(best.get(q0), top_s, pos + r0, k)
    out_s = torch.empty((n_q, k), dtype=acc, device=queries.device)
    out_i = torch.empty((n_q, k), dtype=torch.int64, device=queries.device)
    for q0, (s, i) in best.items():
        out_s[q0:q0 + s.shape[0]], out_i[q0:q0 + s.shape[0]] = _best_first(s, i, metric)
    return out_s, out_i


@torch.no_grad()
def rerank_torch(queries: Tensor, database: Tensor, candidates: Tensor, k: int, dim: int,
                 metric: str) -> tuple[Tensor, Tensor]:
    """Re-score each query's candidate ids [Q, S] on the first `dim` dims and keep the best k:
    (scores [Q, k] fp32 (fp64 for fp64 inputs), database ids [Q, k] int64), best first. No gradient.

    A batch of queries' candidate rows is gathered into a reused buffer (index_select(out=)) and scored
    against its own query. On the CPU the batch is sized to stay in cache and scored with vecdot, since
    bmm of many matrix-vector products is 8x slower per query there; on a GPU bmm is the fast form."""
    acc = acc_dtype(database.dtype)
    n_q, n_cand = candidates.shape
    cpu = queries.device.type == "cpu"
    budget = CPU_BLOCK if cpu else max(1, SCORE_CHUNK_BYTES // (torch.finfo(acc).bits // 8))
    qb = max(1, min(n_q, budget // (n_cand * dim)))  # gathered rows: qb * S * dim elements
    prefix = database[:, :dim]
    rows_buf = torch.empty((qb * n_cand, dim), dtype=database.dtype, device=queries.device)
    out_s = torch.empty((n_q, k), dtype=acc, device=queries.device)
    out_i = torch.empty((n_q, k), dtype=torch.int64, device=queries.device)
    for q0 in range(0, n_q, qb):
        cand = candidates[q0:q0 + qb]
        q, q_sq = _prepared_queries(queries[q0:q0 + qb], dim, acc, metric)
        x = torch.index_select(prefix, 0, cand.reshape(-1), out=rows_buf[:cand.numel()])
        x = x.view(cand.shape[0], n_cand, dim).to(acc)  # [qb, S, dim]; a copy only for 16-bit storage
        s = torch.linalg.vecdot(x, q[:, None, :]) if cpu else torch.bmm(x, q.unsqueeze(2)).squeeze(2)  # [qb, S]
        _orient_(s, metric, q_sq, _row_scale(x, metric, 2))
        best, pos = torch.topk(s, k, dim=1, sorted=True)
        out_s[q0:q0 + qb], out_i[q0:q0 + qb] = _unorient(best, metric), cand.gather(1, pos)
    return out_s, out_i
