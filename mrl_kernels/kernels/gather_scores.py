"""Gather-dot: each query's scores against the database rows it names, on the first DIM columns, read in place
in the storage dtype (fp32 sums), written as int64 keys that one torch.topk turns into the answer.

IDS [Q, n_ids] name rows in groups of ROWS_PER_ID: id i stands for rows i * ROWS_PER_ID ... + ROWS_PER_ID - 1
(prefix_topk passes tile ids with ROWS_PER_ID = the tile height; rerank passes row ids with ROWS_PER_ID = 1).
Grid (queries, row blocks): a program scores BLOCK_R of one query's rows with CUDA-core FMAs; a re-score reads
each row once and does DIM FMAs per row, so it is bound by memory, not arithmetic, and needs no tensor cores.

Scores are the metric's own (the reference's): q.x, q.x / (max(|q|, eps) max(|x|, eps)), or -max(|q|^2 + |x|^2
- 2 q.x, 0) for l2 (negated so larger is better; NaN kept). The key holds an order-preserving int32 of the score
in its high half (NaN above every number, a row past the database's end below everything) and 2^32 - 1 - row in
its low half: equal scores order by row, the smallest row first, so the ids among ties do not depend on launch
order. Row indices are int32 (the database has at most 2^30 rows); element offsets are int64.
"""
import torch
import triton
import triton.language as tl

from .indexing import row_offsets
from .launch import split_launch_options
from .prefix_tile_max import EPS, MAX_GRID_Y  # the first pass's norm floor and grid limit

LOW31 = tl.constexpr(0x7FFFFFFF)
NAN_HI = tl.constexpr(0x7FFFFFFF)      # high half of a NaN score's key: above every real score
EMPTY_HI = tl.constexpr(-0x80000000)   # high half of a missing row: the bits of a negative NaN, never produced
LOW32 = tl.constexpr(0xFFFFFFFF)    # the low half of a key: 2^32 - 1 - row


@triton.jit
def score_key_high(s):
    """int32 that orders like the fp32 scores s, NaN above everything (s + 0.0 first: -0.0 keys like 0.0)."""
    bits = (s + 0.0).to(tl.int32, bitcast=True)
    hi = bits ^ ((bits >> 31) & LOW31)  # negative floats flip their magnitude bits
    return tl.where(s != s, NAN_HI, hi)


@triton.jit
def gather_scores_kernel(
    Q, X, IDS, OUT, n_rows, n_ids, stride_q, stride_x, stride_ids, stride_out,
    DIM: tl.constexpr, METRIC: tl.constexpr, ROWS_PER_ID: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Masks: slots past n_ids * ROWS_PER_ID are not stored; rows >= n_rows (a tile's tail) load as 0 and get
    # the missing-row key; columns >= DIM load as 0.
    query = tl.program_id(0)
    slot = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot_ok = slot < n_ids * ROWS_PER_ID
    ids = tl.load(IDS + row_offsets(query, stride_ids) + slot // ROWS_PER_ID, mask=slot_ok, other=0)
    rows = ids * ROWS_PER_ID + slot % ROWS_PER_ID
    row_ok = slot_ok & (rows < n_rows)
    x_ptrs = X + row_offsets(rows, stride_x)[:, None]
    q_ptr = Q + row_offsets(query, stride_q)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_R], tl.float32)
    sq_x = tl.zeros([BLOCK_R], tl.float32)
    sq_q = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        col_ok = (k0 + kk) < DIM
        qv = tl.load(q_ptr + k0 + kk, mask=col_ok, other=0.0).to(tl.float32)
        xt = tl.load(x_ptrs + (k0 + kk)[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xt * qv[None, :], axis=1)
        if METRIC != "ip":
            sq_x += tl.sum(xt * xt, axis=1)
            sq_q += qv * qv
    if METRIC == "cosine":
        s = acc / (tl.maximum(tl.sqrt(tl.sum(sq_q, axis=0)), EPS) * tl.maximum(tl.sqrt(sq_x), EPS))
    elif METRIC == "l2":
        d = tl.sum(sq_q, axis=0) + sq_x - 2.0 * acc
        s = -tl.where(d != d, d, tl.maximum(d, 0.0))  # the clamp must not swallow NaN
    else:
        s = acc
    hi = tl.where(row_ok, score_key_high(s), EMPTY_HI)
    keys = (hi.to(tl.int64) << 32) | (LOW32 - rows.to(tl.int64))
    tl.store(OUT + row_offsets(query, stride_out) + slot, keys, mask=slot_ok)


def gather_config(dtype: torch.dtype, dim: int) -> dict:
    """128 rows per program; BLOCK_K follows the prefix up to 64 columns (a row's 16-bit prefix in 128-B
    pieces); 4 warps."""
    return {"BLOCK_R": 128, "BLOCK_K": min(64, triton.next_power_of_2(dim)), "num_warps": 4}


def gather_keys(queries: torch.Tensor, database: torch.Tensor, ids: torch.Tensor, dim: int, metric: str,
                rows_per_id: int = 1) -> torch.Tensor:
    """int64 keys [Q, n_ids * rows_per_id] of each query against the rows its ids name (see the module
    docstring). queries [Q, >= dim], database [N, >= dim] with unit column stride, same dtype and device;
    ids [Q, n_ids] int32 in [0, cdiv(N, rows_per_id))."""
    n_q, n_ids = ids.shape
    cfg = gather_config(database.dtype, dim)
    out = torch.empty((n_q, n_ids * rows_per_id), dtype=torch.int64, device=database.device)
    constexprs, options = split_launch_options(cfg)
    # grid axis 1 holds at most 65,535 blocks: more ids per query go in several launches on column slices
    ids_per_launch = max(1, MAX_GRID_Y * cfg["BLOCK_R"] // rows_per_id)
    for c0 in range(0, n_ids, ids_per_launch):
        part, cols = ids[:, c0:c0 + ids_per_launch], out[:, c0 * rows_per_id:(c0 + ids_per_launch) * rows_per_id]
        grid = (n_q, triton.cdiv(part.shape[1] * rows_per_id, cfg["BLOCK_R"]))
        gather_scores_kernel[grid](queries, database, part, cols, database.shape[0], part.shape[1], queries.stride(0),
                                   database.stride(0), part.stride(0), cols.stride(0), DIM=dim, METRIC=metric,
                                   ROWS_PER_ID=rows_per_id, **constexprs, **options)
    return out


def decode_keys(keys: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 scores, int64 row ids) from gather keys; l2 scores come back as distances (0 - s: no -0.0)."""
    hi = (keys >> 32).to(torch.int32)
    scores = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return (0.0 - scores if metric == "l2" else scores), LOW32.value - (keys & LOW32.value)


# Re-scores compiled ahead of time: prefix_topk's tiles (128-row groups) at the shortlist dims 8 and 16, and
# rerank's row ids at a funnel stage (64) and the full 2048 dims of adaptive retrieval; l2 (both norms) in every
# case, ip and cosine at d = 16; fp16 (the shipped storage) everywhere, bf16 and fp32 at d = 16 and (fp32) 2048.
AOT_CASES = [(torch.float16, "l2", "tiles", 8), (torch.float16, "l2", "tiles", 16), (torch.float16, "ip", "tiles", 16),
             (torch.float16, "cosine", "tiles", 16), (torch.float16, "l2", "rows", 64),
             (torch.float16, "l2", "rows", 2048), (torch.bfloat16, "l2", "tiles", 16),
             (torch.float32, "l2", "tiles", 16), (torch.float32, "l2", "rows", 2048)]


def aot_specs():
    from .aot import pointer  # the compiler module: imported by the AOT check only, not by a launch

    for dtype, metric, ids, dim in AOT_CASES:
        constexprs, options = split_launch_options(gather_config(dtype, dim))
        constexprs.update(DIM=dim, METRIC=metric, ROWS_PER_ID=128 if ids == "tiles" else 1)
        signature = {"Q": pointer(dtype), "X": pointer(dtype), "IDS": "*i32", "OUT": "*i64", "n_rows": "i32",
                     "n_ids": "i32", "stride_q": "i32", "stride_x": "i32", "stride_ids": "i32", "stride_out": "i32",
                     **{name: "constexpr" for name in constexprs}}
        options["divisible"] = ("stride_q", "n_rows", "stride_ids")
        yield f"{str(dtype)[6:]}-{metric}-{ids}-d{dim}", gather_scores_kernel, signature, constexprs, options
