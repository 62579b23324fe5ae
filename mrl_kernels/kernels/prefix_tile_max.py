"""The one pass over the database of the exact prefix top-k (prefix_topk.py): for every query and every tile of
BLOCK_N database rows, the best score of the tile on the first DIM columns. Nothing is sorted here.

Grid (query blocks, database splits), query block on axis 0: the programs that run together share a database
split, so each tile comes from DRAM about once and the other query blocks read it from L2. A program loads its
BLOCK_M queries once (the whole prefix when DIM <= BLOCK_K), then walks its split's tiles in a software-pipelined
loop (tl.range num_stages: the next tiles' loads are in flight during this tile's dot). The hot loop holds no
per-query constant: it computes t = q.x (ip), q.x / max(|x|, eps) (cosine) or 2 q.x - |x|^2 (l2), which order
each query's rows like the metric's score (the query's own factor 1 / max(|q|, eps), or -|q|^2, is monotone and
applied by the caller where it needs it), and keeps a NaN-propagating maximum per (query, tile). DIM is a
constexpr, so the column mask is known at compile time and the loads stay vectorised at any dim (d = 8 too).
"""
import torch
import triton
import triton.language as tl

from .indexing import row_offsets
from .launch import split_launch_options

EPS = tl.constexpr(1e-12)  # F.normalize's floor on a norm
MAX_GRID_Y = 65_535        # programs on grid axis 1 (and 2)


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def prefix_tile_max_kernel(
    Q, X, OUT, n_queries, n_rows, tiles_per_split, stride_q, stride_x, stride_out,
    DIM: tl.constexpr,        # columns scored (the prefix)
    METRIC: tl.constexpr,     # "ip", "cosine" or "l2"
    PRECISION: tl.constexpr,  # tl.dot precision: "ieee" keeps fp32 inputs exact
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # Tiles: BLOCK_M queries x BLOCK_N database rows, BLOCK_K (>= 16, tl.dot's minimum) columns per dot step.
    # Masks: query rows >= n_queries load as 0 and are never stored; columns >= DIM load as 0 and add nothing;
    # database rows >= n_rows (the last tile's tail) score -inf, below every real row.
    qrows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qrows < n_queries
    q_ptrs = Q + row_offsets(qrows, stride_q)[:, None]
    kk = tl.arange(0, BLOCK_K)
    out = OUT + row_offsets(qrows, stride_out)
    n_tiles = tl.cdiv(n_rows, BLOCK_N)
    first = tl.program_id(1) * tiles_per_split
    if DIM <= BLOCK_K:  # the whole prefix in one dot step: the query tile is loop-invariant
        q_tile = tl.load(q_ptrs + kk[None, :], mask=q_ok[:, None] & (kk < DIM)[None, :], other=0.0)
    for i in tl.range(0, tl.minimum(tiles_per_split, n_tiles - first), num_stages=NUM_STAGES):
        xrows = (first + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        x_ok = xrows < n_rows
        x_ptrs = X + row_offsets(xrows, stride_x)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        sq_x = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, DIM, BLOCK_K):
            col_ok = (k0 + kk) < DIM
            if DIM <= BLOCK_K:
                qt = q_tile
            else:
                qt = tl.load(q_ptrs + (k0 + kk)[None, :], mask=q_ok[:, None] & col_ok[None, :], other=0.0)
            xt = tl.load(x_ptrs + (k0 + kk)[None, :], mask=x_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(qt, tl.trans(xt), acc, input_precision=PRECISION)
            if METRIC != "ip":
                xf = xt.to(tl.float32)
                sq_x += tl.sum(xf * xf, axis=1)
        if METRIC == "cosine":
            t = acc * (1.0 / tl.maximum(tl.sqrt(sq_x), EPS))[None, :]
        elif METRIC == "l2":
            t = 2.0 * acc - sq_x[None, :]
        else:
            t = acc
        t = tl.where(x_ok[None, :], t, float("-inf"))
        tl.store(out + first + i, tl.reduce(t, 1, _nan_max), mask=q_ok)


def tile_config(dtype: torch.dtype, dim: int, block_n: int) -> dict:
    """Tiles of a launch (the AOT check compiles exactly these). 16-bit: 128 queries x block_n rows, one
    m64nNk16 wgmma per warpgroup with 8 warps; BLOCK_K covers the prefix up to 64 columns in one step, and
    32 per step of the K loop above that (64 would hold 160 registers with the norms). fp32 (the exact,
    non-tensor-core dot): 32 queries, BLOCK_K up to 32, within 128 registers. 3 stages keep two tiles' loads
    in flight."""
    fp32 = dtype == torch.float32
    block_k = max(16, triton.next_power_of_2(dim))
    block_k = min(block_k, 32) if fp32 or dim > 64 else block_k
    return {"BLOCK_M": 32 if fp32 else 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8,
            "NUM_STAGES": 3, "PRECISION": "ieee" if fp32 else "tf32"}


def tile_maxima(queries: torch.Tensor, database: torch.Tensor, dim: int, metric: str, block_n: int,
                splits: int | None = None) -> torch.Tensor:
    """[Q, cdiv(N, block_n)] fp32: each query's best t (see the module docstring) in each tile of block_n
    rows. queries [Q, >= dim] and database [N, >= dim] with unit column stride, same dtype and device."""
    cfg = tile_config(queries.dtype, dim, block_n)
    n_q, n = queries.shape[0], database.shape[0]
    n_tiles = triton.cdiv(n, block_n)
    out = torch.empty((n_q, n_tiles), dtype=torch.float32, device=queries.device)
    q_blocks = triton.cdiv(n_q, cfg["BLOCK_M"])
    splits = min(n_tiles, splits or database_splits(q_blocks, n_tiles, queries.device))
    per_split = triton.cdiv(n_tiles, splits)
    constexprs, options = split_launch_options(cfg)
    grid = (q_blocks, triton.cdiv(n_tiles, per_split))
    prefix_tile_max_kernel[grid](queries, database, out, n_q, n, per_split, queries.stride(0), database.stride(0),
                                 out.stride(0), DIM=dim, METRIC=metric, **constexprs, **options)
    return out


def database_splits(q_blocks: int, n_tiles: int, device: torch.device) -> int:
    """About four waves of two programs per multiprocessor on a GPU, at least a few tiles per program (the
    pipeline needs a loop to overlap); 3 on the CPU, to exercise several splits and a short last one.
    Grid axis 1 holds at most MAX_GRID_Y."""
    if device.type != "cuda":
        return 3
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(8 * sms, q_blocks), triton.cdiv(n_tiles, 4), MAX_GRID_Y))


# The launches compiled ahead of time, with the hints the JIT applies at these shapes (pointers, strides and row
# counts divisible by 16, DIM a constexpr). fp16, the shipped storage, at every metric: the shortlist dims 8 and
# 16 at the tile heights prefix_topk picks for 10M rows (128 for k <= ~200, 64 above), a funnel stage (64) and
# exact full-dim search (2048, a K loop); bf16 and fp32 at d = 16 and (fp32) 2048.
AOT_CASES = [(torch.float16, dim, block_n) for dim, block_n in ((8, 128), (16, 128), (16, 64), (64, 128), (2048, 128))]
AOT_CASES += [(torch.bfloat16, 16, 128), (torch.float32, 16, 128), (torch.float32, 2048, 128)]


def aot_specs():
    from .aot import pointer  # the compiler module: imported by the AOT check only, not by a launch

    for dtype, dim, block_n in AOT_CASES:
        for metric in ("ip", "cosine", "l2"):
            constexprs, options = split_launch_options(tile_config(dtype, dim, block_n))
            constexprs.update(DIM=dim, METRIC=metric)
            signature = {"Q": pointer(dtype), "X": pointer(dtype), "OUT": "*fp32", "n_queries": "i32", "n_rows": "i32",
                         "tiles_per_split": "i32", "stride_q": "i32", "stride_x": "i32", "stride_out": "i32",
                         **{name: "constexpr" for name in constexprs}}
            options["divisible"] = ("stride_q", "n_rows", "n_queries")
            yield (f"{str(dtype)[6:]}-{metric}-d{dim}-n{block_n}", prefix_tile_max_kernel, signature, constexprs,
                   options)
