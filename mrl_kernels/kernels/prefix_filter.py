"""Exact top-k for large k (k > KS_MAX) by a threshold filter: no score matrix, no in-kernel candidate lists.

Two passes over the database prefix, scored as in prefix_topk (tile_scores, score_keys: int32 keys that order
like the scores, NaN first):
1. `tile_max_kernel` writes each query's best key per database tile of BLOCK_N rows ([Q, tiles] int32, a
   BLOCK_N-th of the scores). Each of the k best rows lies in a tile whose best key is at least the k-th best
   key, and at most k tiles have one, so tau = the k-th best tile maximum is at most the k-th best key.
2. `filter_kernel` appends every key above tau to the query's list (fewer than k * BLOCK_N exist: they lie in
   the fewer than k tiles whose maximum is above tau) and keys equal to tau to a second list of at most k
   (the answer needs k minus the count above of them, at least that many exist, and which ones is free, as for
   any tie). A tile reserves its slots with one relaxed atomic add per query and places its keys by a
   cumulative sum; tiles with nothing to add cost only their scores.
torch.topk over the lists (int64: key high, row low, as in prefix_topk) gives the answer. A list that overflows
its capacity still counts its keys exactly, so those queries are filtered again with exactly that capacity.
"""
import torch
import triton
import triton.language as tl

from .indexing import row_offsets
from .launch import split_launch_options
from .prefix_scores import EMPTY_HI, NAN_HI, decode, launch_config, score_keys, split_rows, tile_scores

CAPACITY_PER_K = 4  # list capacity per query in units of k: typically the keys above tau number about k


@triton.jit
def tile_max_kernel(
    Q, X, OUT, n_queries, n_rows, dim, rows_per_split, stride_q, stride_x, stride_out,
    METRIC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid (query blocks, database splits) as prefix_topk_kernel; OUT[q, t] = best key of query q in tile t.
    qrows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qrows < n_queries
    q_ptrs = Q + row_offsets(qrows, stride_q)[:, None]
    out = OUT + row_offsets(qrows, stride_out)
    first = tl.program_id(1) * rows_per_split
    # Only tiles that hold a row: the last split may reach past n_rows (no padding tiles are scored or stored).
    for n0 in range(0, tl.minimum(rows_per_split, n_rows - first), BLOCK_N):
        xrows = first + n0 + tl.arange(0, BLOCK_N)
        x_ok = xrows < n_rows
        s = tile_scores(q_ptrs, q_ok, X, xrows, x_ok, dim, stride_x, METRIC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        tile_max = tl.max(score_keys(s, x_ok), axis=1)
        tl.store(out + (first + n0) // BLOCK_N, tile_max, mask=q_ok)


@triton.jit
def filter_kernel(
    Q, X, TAU, OUT, COUNT, n_queries, n_rows, dim, rows_per_split, stride_q, stride_x, stride_out, capacity,
    n_ties, METRIC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # OUT[q, :capacity] gets the keys above TAU[q], OUT[q, capacity:capacity + n_ties] keys equal to it;
    # COUNT[q] = (keys above, keys equal), counted past the capacities.
    qrows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qrows < n_queries
    q_ptrs = Q + row_offsets(qrows, stride_q)[:, None]
    out = OUT + row_offsets(qrows, stride_out)[:, None]
    tau = tl.load(TAU + qrows, mask=q_ok, other=NAN_HI)[:, None]
    first = tl.program_id(1) * rows_per_split
    for n0 in range(0, tl.minimum(rows_per_split, n_rows - first), BLOCK_N):  # tiles that hold a row
        xrows = first + n0 + tl.arange(0, BLOCK_N)
        x_ok = xrows < n_rows
        s = tile_scores(q_ptrs, q_ok, X, xrows, x_ok, dim, stride_x, METRIC, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        hi = score_keys(s, x_ok)
        ok = q_ok[:, None] & x_ok[None, :]
        above = ok & (hi > tau)
        tie = ok & (hi == tau)
        n_above = tl.sum(above.to(tl.int32), axis=1)
        n_tie = tl.sum(tie.to(tl.int32), axis=1)
        if tl.max(n_above + n_tie, axis=0) > 0:
            keys = (hi.to(tl.int64) << 32) | xrows.to(tl.int64)[None, :]
            base = tl.atomic_add(COUNT + 2 * qrows, n_above, mask=q_ok, sem="relaxed")
            slot = base[:, None] + tl.cumsum(above.to(tl.int32), axis=1) - 1
            tl.store(out + slot, keys, mask=above & (slot < capacity))
            base = tl.atomic_add(COUNT + 2 * qrows + 1, n_tie, mask=q_ok, sem="relaxed")
            slot = base[:, None] + tl.cumsum(tie.to(tl.int32), axis=1) - 1
            tl.store(out + capacity + slot, keys, mask=tie & (slot < n_ties))


def _filter(queries, database, tau, k, dim, metric, cfg, capacity):
    """(int64 keys [Q, capacity + k] padded with the empty key, int32 counts [Q, 2]) for thresholds tau."""
    constexprs, options = split_launch_options(cfg)
    keys = torch.full((queries.shape[0], capacity + k), EMPTY_HI.value << 32, dtype=torch.int64,
                      device=queries.device)
    count = torch.zeros((queries.shape[0], 2), dtype=torch.int32, device=queries.device)
    grid, per_split = split_rows(queries.shape[0], database.shape[0], cfg, queries.device)
    filter_kernel[grid](queries, database, tau, keys, count, queries.shape[0], database.shape[0], dim, per_split,
                        queries.stride(0), database.stride(0), keys.stride(0), capacity, k, METRIC=metric,
                        **constexprs, **options)
    return keys, count


def filter_config(dtype: torch.dtype, dim: int) -> dict:
    """The score tiles of prefix_topk's chunked path (no candidate list: KS = 1, dropped here), with 8 warps:
    the filter holds a tile's scores, keys, int64 keys and slot offsets at once (4 warps spill)."""
    cfg = launch_config(dtype, dim, 1)
    del cfg["KS"]
    return dict(cfg, num_warps=8)


def filtered_topk(queries: torch.Tensor, database: torch.Tensor, k: int, dim: int, metric: str,
                  capacity: int | None = None, budget_bytes: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores fp32 [Q, k], ids int64 [Q, k]), best first, as prefix_topk_triton. Needs at least k database
    tiles of filter_config's BLOCK_N rows. `capacity` (default CAPACITY_PER_K * k) is the first try's list
    length; query batches keep the tile maxima and lists within about budget_bytes."""
    cfg = filter_config(queries.dtype, dim)
    n_q, n = queries.shape[0], database.shape[0]
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    if n_tiles < k:
        raise ValueError(f"filtered_topk needs at least k={k} tiles of {cfg['BLOCK_N']} rows, got {n_tiles}")
    if queries.stride(1) != 1:
        queries = queries.contiguous()
    capacity = capacity or CAPACITY_PER_K * k
    q_batch = max(1, min(n_q, budget_bytes // (n_tiles * 4 + (capacity + k) * 8)))
    if q_batch > cfg["BLOCK_M"]:  # whole query blocks: each batch reads the database twice
        q_batch -= q_batch % cfg["BLOCK_M"]
    constexprs, options = split_launch_options(cfg)
    best = torch.empty((n_q, k), dtype=torch.int64, device=queries.device)
    for q0 in range(0, n_q, q_batch):
        q = queries[q0:q0 + q_batch]
        tile_max = torch.empty((q.shape[0], n_tiles), dtype=torch.int32, device=queries.device)
        grid, per_split = split_rows(q.shape[0], n, cfg, queries.device)
        tile_max_kernel[grid](q, database, tile_max, q.shape[0], n, dim, per_split, q.stride(0), database.stride(0),
                              tile_max.stride(0), METRIC=metric, **constexprs, **options)
        tau = torch.topk(tile_max, k, dim=1).values[:, -1].contiguous()
        keys, count = _filter(q, database, tau, k, dim, metric, cfg, capacity)
        _check_count(count, k)
        best[q0:q0 + q.shape[0]] = torch.topk(keys, k, dim=1).values
        over = (count[:, 0] > capacity).nonzero()[:, 0]
        if over.numel():  # filter those queries again with room for every key they have above tau
            exact = int(count[over, 0].max())
            sub = max(1, budget_bytes // ((exact + k) * 8))
            for i in range(0, over.numel(), sub):
                rows = over[i:i + sub]
                keys, count = _filter(q[rows], database, tau[rows], k, dim, metric, cfg, exact)
                _check_count(count, k)
                best[q0 + rows] = torch.topk(keys, k, dim=1).values
    return decode(best, metric)


def _check_count(count, k):
    """Every query must have found k keys at or above tau. Fewer would mean the two kernels scored a row
    differently (they share tile_scores, so they should not); padding would then decode as NaN scores,
    which look like the NaN rows that rank first. Refuse that rather than return it."""
    found = count[:, 0] + count[:, 1].clamp(max=k)
    if bool((found < k).any()):
        raise RuntimeError(f"prefix top-k filter found {int(found.min())} < k={k} rows at or above the threshold: "
                           "the tile-maximum and filter passes disagree; please report this")


def aot_specs():
    from .aot import pointer  # the compiler module: imported by the AOT check only, not by a launch

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for metric, dim in (("ip", 16), ("cosine", 64), ("l2", 16)):
            constexprs, options = split_launch_options(filter_config(dtype, dim))
            constexprs["METRIC"] = metric
            common = {"Q": pointer(dtype), "X": pointer(dtype)}
            sizes = {"n_queries": "i32", "n_rows": "i32", "dim": "i32", "rows_per_split": "i32", "stride_q": "i32",
                     "stride_x": "i32", "stride_out": "i32"}
            consts = {name: "constexpr" for name in constexprs}
            label = f"{str(dtype)[6:]}-{metric}-d{dim}"
            yield (f"tile_max-{label}", tile_max_kernel, {**common, "OUT": "*i32", **sizes, **consts}, constexprs,
                   options)
            yield (f"filter-{label}", filter_kernel,
                   {**common, "TAU": "*i32", "OUT": "*i64", "COUNT": "*i32", **sizes, "capacity": "i32",
                    "n_ties": "i32", **consts}, constexprs, options)
