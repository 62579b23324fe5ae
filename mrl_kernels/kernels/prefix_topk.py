"""Exact top-k search on a prefix of the dims: each query's best k database rows on the first `dim` columns,
without writing the Q x N score matrix.

Kernel (`prefix_topk_kernel`), grid = (query blocks, database splits). A program owns BLOCK_M queries and a
split of whole BLOCK_N-row database tiles (the last split's tail is masked). Per tile it forms the scores with
tl.dot over the first `dim` columns, read in place through the row stride (K loop of BLOCK_K columns, the tail
masked), and in the same loop accumulates the sums of squares of the loaded query and database tiles, so the
metric's normalisation needs no extra pass: "ip" q.x; "cosine" q.x / (max(|q|, 1e-12) max(|x|, 1e-12)) with
prefix norms (a zero row scores 0, as F.normalize); "l2" max(|q|^2 + |x|^2 - 2 q.x, 0).
Selection: every score becomes an int64 key that sorts like "better" (the fp32 bits of the score, or of minus
the distance for l2, made order-preserving as a signed int32, in the high half; the database row in the low
half), so one integer top-k carries the row ids with the scores. Each query keeps its best KS =
next_power_of_2(k) <= KS_MAX keys, sorted; a tile is merged (a bitonic top-KS of the tile, ascending; the
elementwise max with the running descending list holds the best KS as a bitonic sequence, which one bitonic
merge sorts) only when some query of the block has a tile key above its current KS-th best, so past the
first tiles most tiles cost just the dot. Programs write [Q, splits * KS] keys (every element: a split with
fewer than KS rows pads with a sentinel below every real key); torch.topk over them and a decode of the keys
give the result. Exact: the key order is the score order (ties broken by row id, any order being allowed).
k > KS_MAX: a threshold filter (prefix_filter.py) where the database has at least k tiles; below that (at most
k * BLOCK_N rows) the same kernel with SELECT=False writes oriented fp32 scores of one bounded [query batch,
database chunk] block at a time (never the whole matrix), merged with torch.topk per chunk; both exact.

NaN: a NaN score (from a NaN in a query or database row, or inf - inf) gets the largest key, so it ranks first for every
metric (for l2 that differs from torch.topk's smallest-k, which would put NaN last and silently drop it):
NaN rows surface in the results with NaN scores instead of passing silently. Nothing crashes.
"""
import torch
import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

from .indexing import row_offsets
from .launch import split_launch_options
from .prefix_filter import filter_config, filtered_topk
from .prefix_scores import EMPTY_HI, decode, launch_config, score_keys, split_rows, tile_scores

KS_MAX = 128  # largest in-kernel candidate list per query and split; larger k takes the chunked path


@constexpr_function
def _log2(n):
    return n.bit_length() - 1


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(h, flip, i: tl.constexpr):
    """One bitonic step on axis i (from the innermost) of a [2, 2, ...] hypercube: each pair becomes (min, max),
    or (max, min) where flip is set. tl.sort's version finds the partner with xor_sum, which the interpreter
    reduces one element at a time in Python; min / max over the pair axis run in NumPy there."""
    n_dims: tl.constexpr = _log2(h.numel)
    lo = tl.min(h, axis=n_dims - 1 - i, keep_dims=True)
    hi = tl.max(h, axis=n_dims - 1 - i, keep_dims=True)
    return tl.where((flip ^ _indicator(n_dims, i)) == 1, hi, lo)


@triton.jit
def _bitonic_stage(h, stage: tl.constexpr, order: tl.constexpr):
    """order 0: ascending, 1: descending, 2: alternating runs of 2**stage."""
    if order == 2:
        flip = _indicator(_log2(h.numel), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_and_swap(h, flip, stage - 1 - i)
    return h


@triton.jit
def _topk_last(x, K: tl.constexpr, ORDER: tl.constexpr):
    """The K largest entries along the last axis of x (a power of two), sorted (ORDER 0: ascending, 1:
    descending): bitonic sort of runs of K, then halving by pairwise max of an ascending and a descending run
    (as tl.topk)."""
    log_n: tl.constexpr = _log2(x.shape[len(x.shape) - 1])
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(x.numel))
    for i in tl.static_range(1, log_k + 1):
        h = _bitonic_stage(h, i, 2 if i < log_n else ORDER)
    for i in tl.static_range(log_k + 1, log_n + 1):
        h = tl.max(h, axis=_log2(h.numel) - 1 - log_k)
        h = _bitonic_stage(h, log_k, 2 if i < log_n else ORDER)
    return tl.reshape(h, [x.shape[0], K])


@triton.jit
def _merge_best(best, top):
    """The K largest of best (descending) and top (ascending), descending: their elementwise max holds the K
    largest as a bitonic sequence, which one bitonic merge sorts."""
    h = tl.reshape(tl.maximum(best, top), [2] * _log2(best.numel))
    h = _bitonic_stage(h, _log2(best.shape[1]), 1)
    return tl.reshape(h, best.shape)


@triton.jit
def prefix_topk_kernel(
    Q, X, OUT, n_queries, n_rows, dim, rows_per_split, stride_q, stride_x, stride_out,
    METRIC: tl.constexpr,     # "ip", "cosine" or "l2"
    SELECT: tl.constexpr,     # True: write each query's best KS keys per split; False: write oriented scores
    KS: tl.constexpr,         # candidates kept per query and split (power of two, <= BLOCK_N)
    PRECISION: tl.constexpr,  # tl.dot precision: "ieee" keeps fp32 inputs exact
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tiles: BLOCK_M queries x BLOCK_N database rows, BLOCK_K columns per dot step.
    # Masks: query rows >= n_queries (loaded as 0, never stored), database rows >= n_rows (key = padding,
    # score never stored), columns >= dim (loaded as 0, adding nothing to dots or norms).
    qrows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qrows < n_queries
    q_ptrs = Q + row_offsets(qrows, stride_q)[:, None]
    # A loop bound taken from program_id breaks the interpreter: every split walks rows_per_split (whole tiles).
    first = tl.program_id(1) * rows_per_split
    best = tl.full([BLOCK_M, KS], EMPTY_HI, tl.int64) << 32
    for n0 in range(0, rows_per_split, BLOCK_N):
        xrows = first + n0 + tl.arange(0, BLOCK_N)
        x_ok = xrows < n_rows
        s = tile_scores(q_ptrs, q_ok, X, xrows, x_ok, dim, stride_x, METRIC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        if SELECT:
            keys = (score_keys(s, x_ok).to(tl.int64) << 32) | xrows.to(tl.int64)[None, :]
            # Merge only when some query of the block has a key above its KS-th best.
            better = tl.max(keys, axis=1) > tl.min(best, axis=1)
            if tl.max(better.to(tl.int32), axis=0) > 0:
                best = _merge_best(best, _topk_last(keys, KS, 0))
        else:
            out = OUT + row_offsets(qrows, stride_out)[:, None] + xrows[None, :]
            tl.store(out, s, mask=q_ok[:, None] & x_ok[None, :])
    if SELECT:
        out = OUT + row_offsets(qrows, stride_out)[:, None] + (tl.program_id(1) * KS + tl.arange(0, KS))[None, :]
        tl.store(out, best, mask=q_ok[:, None])


def _launch(queries, database, out, dim, metric, cfg, select, rows_per_split, n_splits):
    constexprs, options = split_launch_options(cfg)
    grid = (triton.cdiv(queries.shape[0], cfg["BLOCK_M"]), n_splits)
    prefix_topk_kernel[grid](queries, database, out, queries.shape[0], database.shape[0], dim, rows_per_split,
                             queries.stride(0), database.stride(0), out.stride(0), METRIC=metric, SELECT=select,
                             **constexprs, **options)


def _chunked_topk(queries, database, k, dim, metric, chunk_elems):
    """k > KS_MAX: oriented scores of [query batch, database chunk] blocks of at most chunk_elems, each
    merged into the running best k with torch.topk."""
    n_q, n = queries.shape[0], database.shape[0]
    cfg = launch_config(queries.dtype, dim, 1)
    n_chunk = min(n, max(k, chunk_elems // max(1, min(n_q, cfg["BLOCK_M"]))))
    q_batch = max(1, min(n_q, chunk_elems // n_chunk))
    scores = torch.empty((n_q, k), dtype=torch.float32, device=queries.device)
    ids = torch.empty((n_q, k), dtype=torch.int64, device=queries.device)
    buf = torch.empty((q_batch, n_chunk), dtype=torch.float32, device=queries.device)
    for q0 in range(0, n_q, q_batch):
        q = queries[q0:q0 + q_batch]
        best_s = best_i = None
        for n0 in range(0, n, n_chunk):
            x = database[n0:n0 + n_chunk]  # a view: the kernel reads the rows in place
            s = buf[:q.shape[0], :x.shape[0]]
            _launch(q, x, s, dim, metric, cfg, False, cfg["BLOCK_N"], triton.cdiv(x.shape[0], cfg["BLOCK_N"]))
            v, i = torch.topk(s, min(k, x.shape[0]), dim=1)  # NaN ranks first
            i = i + n0
            if best_s is not None:
                v, pos = torch.topk(torch.cat([best_s, v], 1), min(k, best_s.shape[1] + v.shape[1]), dim=1)
                i = torch.cat([best_i, i], 1).gather(1, pos)
            best_s, best_i = v, i
        scores[q0:q0 + q.shape[0]] = 0.0 - best_s if metric == "l2" else best_s
        ids[q0:q0 + q.shape[0]] = best_i
    return scores, ids


def prefix_topk_triton(queries: torch.Tensor, database: torch.Tensor, k: int, dim: int, metric: str,
                       splits: int | None = None, chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores fp32 [Q, k], ids int64 [Q, k]), best first: descending for "ip"/"cosine", ascending squared
    distance for "l2". Inputs validated by the caller (2-D, same fp32/fp16/bf16 dtype and device,
    database.stride(1) == 1, 1 <= k <= N, 1 <= dim <= D). `splits` overrides the number of database splits;
    `chunk_elems` bounds the score block of the k > KS_MAX path."""
    if queries.stride(1) != 1:
        queries = queries.contiguous()
    n_q, n = queries.shape[0], database.shape[0]
    ks = triton.next_power_of_2(k)
    if ks > KS_MAX:
        if triton.cdiv(n, filter_config(queries.dtype, dim)["BLOCK_N"]) >= k:
            return filtered_topk(queries, database, k, dim, metric)
        return _chunked_topk(queries, database, k, dim, metric, chunk_elems)
    cfg = launch_config(queries.dtype, dim, ks)
    (_, splits), per_split = split_rows(n_q, n, cfg, queries.device, splits)
    keys = torch.empty((n_q, splits * ks), dtype=torch.int64, device=queries.device)  # every element written
    _launch(queries, database, keys, dim, metric, cfg, True, per_split, splits)
    return decode(torch.topk(keys, k, dim=1).values, metric)


# The launches compiled ahead of time, every dtype: every metric at the shortlist's small dim and k and at the
# register-heaviest case (the cap at full width); l2 (both norms) at a mid k and in the chunked score path (the
# paper's 8 -> 200 funnel keeps 200 > KS_MAX).
AOT_CASES = {"d16-k10": ((16, 10), ("ip", "cosine", "l2")), "d2048-k128": ((2048, 128), ("ip", "cosine", "l2")),
             "d64-k50": ((64, 50), ("l2",)), "d16-k200": ((16, 200), ("l2",))}


def aot_specs():
    from .aot import pointer  # the compiler module: imported by the AOT check only, not by a launch

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for label, ((dim, k), metrics) in AOT_CASES.items():
            for metric in metrics:
                ks = triton.next_power_of_2(k)
                select = ks <= KS_MAX
                constexprs, options = split_launch_options(launch_config(dtype, dim, ks if select else 1))
                constexprs.update(METRIC=metric, SELECT=select)
                signature = {"Q": pointer(dtype), "X": pointer(dtype), "OUT": "*i64" if select else "*fp32",
                             "n_queries": "i32", "n_rows": "i32", "dim": "i32", "rows_per_split": "i32",
                             "stride_q": "i32", "stride_x": "i32", "stride_out": "i32"}
                signature.update({name: "constexpr" for name in constexprs})
                yield f"{str(dtype)[6:]}-{metric}-{label}", prefix_topk_kernel, signature, constexprs, options
