"""Exact top-k on a prefix of the dims, for every k: one scoring pass that keeps a maximum per database tile, the
best tiles per query from those maxima, a gather re-score of the rows in them, one top-k. No Q x N score matrix,
no sorting inside a kernel.

1. prefix_tile_max.py: M[q, j] = the best t(q, x) over the rows x of tile j (BLOCK_N rows), where t orders a
   query's rows like its score (t = q.x, q.x / |x| or 2 q.x - |x|^2; the score is t, t / |q| or min(t - |q|^2, 0)).
2. torch.topk over M: tau[q] = the k-th largest tile maximum; the selected tiles are those with M >= thr, where
   thr = tau - margin (for l2, min(tau, |q|^2) - margin); at least k tiles qualify.
3. gather_scores.py re-scores every row of the selected tiles with the metric's own formula and writes keys that
   order by (score, smallest row first); torch.topk of those keys is the answer.

Why it is exact. Let e bound the difference between pass 1's t and the t implied by pass 3's score for any row
(both are fp32 sums of the same exact products in different orders, plus a few roundings of the epilogue:
|e| <= 2 (DIM + 8) u A with u = 2^-24, doubled for tensor cores that align and truncate rather than round
while they accumulate, and A = |q| X (ip), |q| (cosine) or (|q| + X)^2 (l2), X the largest prefix
norm in the database), and take margin = 8 (DIM + 8) u A >= 2e. A row in a tile that was not selected has
t1 < thr, so t3 < thr + e <= tau - e. Each of the k tiles with the largest maxima holds a row with t1 >= tau, so
t3 >= tau - e: k selected rows score strictly above every row left out (for l2 with the clamp at distance 0:
a left-out row also has t3 < |q|^2 - e, so its distance is > 0 while those k rows have distance <= that row's
or 0), and the top k of the selected rows, ties to the smallest row, is the top k of the whole database by the
same rule. NaN: a tile holding a NaN score has a NaN maximum (propagated), counted as +inf: such tiles are
selected first (all of them when k or more exist, which holds the k smallest NaN rows), and NaN keys rank
first, as on the CPU. Ties: any number of tiles within the margin of tau are selected (near-duplicate rows cost
re-scoring, never exactness); ids among equal scores are the smallest rows, run after run.

Cost: pass 1 is a dot, a max and (cosine, l2) one multiply or FMA per score, and stores N / BLOCK_N maxima per
query; passes 2-3 read k * BLOCK_N rows per query. BLOCK_N ~ sqrt(0.6 N / k) balances the two. No GPU has timed
it yet (bench/search_gpu.py is the prepared run; bench/NOTES.md has the compiled sm_90 code's numbers).
"""
import math

import torch
import triton

from .gather_scores import decode_keys, gather_keys
from .prefix_tile_max import tile_maxima

UNIT_ROUNDOFF = 2.0 ** -24   # fp32's: every sum here accumulates in fp32
EPILOGUE_ROUNDINGS = 8       # roundings outside the dot (norms, scaling, l2's three terms), counted generously
TILE_ROWS = (32, 64, 128)    # tile heights prefix_topk picks from


def tile_rows(n_rows: int, k: int) -> int:
    """BLOCK_N ~ sqrt(0.6 N / k) (pass 1's stores per query, N / BLOCK_N, against pass 3's reads, k * BLOCK_N),
    rounded to a power of two in TILE_ROWS."""
    target = math.sqrt(0.6 * n_rows / k)
    return min(TILE_ROWS, key=lambda b: abs(math.log2(b) - math.log2(max(target, 1.0))))


def max_prefix_norm(database: torch.Tensor, dim: int, chunk_rows: int = 1 << 20) -> float:
    """The largest L2 norm of a row's first `dim` entries (NaN rows ignored; an infinite one counts as the largest
    float, which keeps the margin finite)."""
    best = 0.0
    for r0 in range(0, database.shape[0], chunk_rows):
        norms = torch.linalg.vector_norm(database[r0:r0 + chunk_rows, :dim], dim=1, dtype=torch.float32)
        best = max(best, float(torch.nan_to_num(norms, nan=0.0).max()))
    return best


def query_norms(queries: torch.Tensor, dim: int) -> torch.Tensor:
    """[Q] float64: |q| of each query's first `dim` entries (the margin's scale, and l2's ceiling |q|^2)."""
    return torch.linalg.vector_norm(queries[:, :dim], dim=1, dtype=torch.float32).double()


def selection_margin(q_norm: torch.Tensor, dim: int, metric: str, x_max: float) -> torch.Tensor:
    """[Q] float64: the margin below tau (in t's units) within which tiles are selected (module docstring);
    q_norm from query_norms."""
    scale = {"ip": q_norm * x_max, "cosine": q_norm, "l2": (q_norm + x_max) ** 2}[metric]
    return 8.0 * (dim + EPILOGUE_ROUNDINGS) * UNIT_ROUNDOFF * scale


def select_tiles(maxima: torch.Tensor, k: int, margin: torch.Tensor, ceiling: torch.Tensor | None) -> torch.Tensor:
    """int32 [Q, w]: for each query, every tile whose maximum is >= min(tau, ceiling) - margin (at least k
    tiles; w is the most any query needs, so a query may get a few more, which costs time only).
    maxima [Q, T] fp32 is modified: NaN becomes +inf."""
    n_tiles = maxima.shape[1]
    if n_tiles <= k:
        return torch.arange(n_tiles, dtype=torch.int32, device=maxima.device).expand(maxima.shape[0], n_tiles)
    maxima.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    width = min(n_tiles, k + max(8, k // 4))
    values, tiles = torch.topk(maxima, width, dim=1)
    threshold = values[:, k - 1].double()
    if ceiling is not None:
        threshold = torch.minimum(threshold, ceiling)
    threshold = threshold - margin
    count = (values.double() >= threshold[:, None]).sum(1)
    if width < n_tiles and bool((count == width).any()):  # some query may have more tiles within the margin
        need = int((maxima.double() >= threshold[:, None]).sum(1).max())
        values, tiles = torch.topk(maxima, need, dim=1)
        count = (values.double() >= threshold[:, None]).sum(1)
    return tiles[:, :int(count.max())].to(torch.int32)


def _batch_queries(n_q: int, n_tiles: int, k: int, block_n: int, budget_bytes: int) -> int:
    """Queries per batch: the tile maxima (and topk's copy) and the gathered keys (and topk's work) of a batch
    within about budget_bytes."""
    per_query = 8 * n_tiles + 16 * (k + max(8, k // 4)) * block_n
    return max(1, min(n_q, budget_bytes // per_query))


def prefix_topk_triton(queries: torch.Tensor, database: torch.Tensor, k: int, dim: int, metric: str,
                       block_n: int | None = None, splits: int | None = None,
                       budget_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores fp32 [Q, k], ids int64 [Q, k]), best first: descending for "ip"/"cosine", ascending squared
    distance for "l2"; equal scores in ascending id. Inputs validated by the caller (2-D, same fp32/fp16/bf16
    dtype and device, unit column stride, 1 <= k <= N <= 2^30, 1 <= dim <= D). block_n, splits: override the
    tile height and pass 1's database splits; budget_bytes: the working memory of a query batch (default on a
    GPU: a quarter of its free memory, at most 16 GB, so that usually all queries go in one batch and the
    database prefix is read once; 256 MB elsewhere)."""
    if queries.stride(1) != 1:
        queries = queries.contiguous()
    n_q, n = queries.shape[0], database.shape[0]
    block_n = block_n or tile_rows(n, k)
    n_tiles = triton.cdiv(n, block_n)
    if budget_bytes is None:
        budget_bytes = 1 << 28
        if queries.is_cuda:
            budget_bytes = max(budget_bytes, min(torch.cuda.mem_get_info(queries.device)[0] // 4, 1 << 34))
    x_max = max_prefix_norm(database, dim) if metric != "cosine" else 1.0
    scores = torch.empty((n_q, k), dtype=torch.float32, device=queries.device)
    ids = torch.empty((n_q, k), dtype=torch.int64, device=queries.device)
    batch = _batch_queries(n_q, n_tiles, k, block_n, budget_bytes)
    for q0 in range(0, n_q, batch):
        q = queries[q0:q0 + batch]
        maxima = tile_maxima(q, database, dim, metric, block_n, splits)
        q_norm = query_norms(q, dim)
        margin = selection_margin(q_norm, dim, metric, x_max)
        ceiling = q_norm ** 2 if metric == "l2" else None
        keys = gather_keys(q, database, select_tiles(maxima, k, margin, ceiling), dim, metric, rows_per_id=block_n)
        del maxima
        scores[q0:q0 + batch], ids[q0:q0 + batch] = decode_keys(torch.topk(keys, k, dim=1).values, metric)
    return scores, ids


def rerank_triton(queries: torch.Tensor, database: torch.Tensor, candidates: torch.Tensor, k: int, dim: int,
                  metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's candidate rows re-scored on the first `dim` columns with the gather-dot kernel, the best k
    kept (scores fp32 and ids int64 [Q, k], best first, equal scores in ascending id). candidates [Q, S] ids in
    [0, N), validated by the caller; a repeated candidate can come back twice, as with the torch backend."""
    if queries.stride(1) != 1:
        queries = queries.contiguous()
    keys = gather_keys(queries, database, candidates.to(torch.int32).contiguous(), dim, metric)
    return decode_keys(torch.topk(keys, k, dim=1).values, metric)
