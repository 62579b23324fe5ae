"""Scoring shared by the search kernels (prefix_topk.py, prefix_filter.py): a query block's oriented scores
against a database tile on the first `dim` columns, the int32 keys that order like them, their decoding, and
the launch geometry (tiles, database splits). Both kernels of the large-k filter must score a row
identically, so there is one definition of each.
"""
import torch
import triton
import triton.language as tl

from .indexing import row_offsets

LOW31 = tl.constexpr(0x7FFFFFFF)
NAN_HI = tl.constexpr(0x7FFFFFFF)       # high half of a NaN score's key: above every real score
EMPTY_HI = tl.constexpr(-0x80000000)    # high half of padding: the bits of a negative NaN, which never occur
EPS = tl.constexpr(1e-12)               # F.normalize's floor on a norm


@triton.jit
def tile_scores(q_ptrs, q_ok, X, xrows, x_ok, dim, stride_x, METRIC: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Oriented fp32 scores (larger is better for every metric) of a query block against database rows `xrows`.
    Masks: query rows off q_ok and database rows off x_ok load as 0, columns >= dim add nothing."""
    x_ptrs = X + row_offsets(xrows, stride_x)[:, None]
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sq_q = tl.zeros([BLOCK_M], tl.float32)
    sq_x = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        col_ok = k0 + kk < dim
        qt = tl.load(q_ptrs + (k0 + kk)[None, :], mask=q_ok[:, None] & col_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs + (k0 + kk)[None, :], mask=x_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(qt, tl.trans(xt), acc, input_precision=PRECISION)
        if METRIC != "ip":
            qf = qt.to(tl.float32)
            xf = xt.to(tl.float32)
            sq_q += tl.sum(qf * qf, axis=1)
            sq_x += tl.sum(xf * xf, axis=1)
    if METRIC == "cosine":
        inv_q = 1.0 / tl.maximum(tl.sqrt(sq_q), EPS)
        inv_x = 1.0 / tl.maximum(tl.sqrt(sq_x), EPS)
        return acc * inv_q[:, None] * inv_x[None, :]
    elif METRIC == "l2":
        d = sq_q[:, None] + sq_x[None, :] - 2.0 * acc
        return -tl.where(d != d, d, tl.maximum(d, 0.0))  # the clamp must not swallow NaN
    else:
        return acc


@triton.jit
def score_keys(s, x_ok):
    """int32 keys that order like the scores s (NaN above everything, rows off x_ok below everything)."""
    bits = s.to(tl.int32, bitcast=True)
    hi = bits ^ ((bits >> 31) & LOW31)  # order-preserving: negative floats flip their magnitude bits
    hi = tl.where(s != s, NAN_HI, hi)
    return tl.where(x_ok[None, :], hi, EMPTY_HI)


def launch_config(dtype: torch.dtype, dim: int, ks: int) -> dict:
    """Tiles for a launch; the AOT compile test compiles exactly these (see its register and spill report).
    BLOCK_N >= KS so a tile's top KS exists; BLOCK_K follows dim up to 32 (fp32) / 64 (16-bit), since the
    shortlist dims are small (8, 16) and a wider K tile would only add masked zeros; fp32 uses the exact
    (non tensor-core) dot. Big candidate lists halve the query block and (KS = 128) double the warps to keep
    the keys in registers."""
    fp32 = dtype == torch.float32
    block_k = min(32 if fp32 else 64, max(16, triton.next_power_of_2(dim)))
    block_n = max(64, ks)
    block_m = 64 if ks <= 32 else 32
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "KS": ks, "num_warps": 8 if ks >= 128 else 4,
            "num_stages": 1 if fp32 else 3, "PRECISION": "ieee" if fp32 else "tf32"}


def database_splits(n_queries: int, n_rows: int, block_m: int, block_n: int, device: torch.device) -> int:
    """About two programs per multiprocessor on a GPU (2 on the CPU, to exercise the merge); never empty."""
    tiles = triton.cdiv(n_rows, block_n)
    if device.type != "cuda":
        return min(2, tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(n_queries, block_m)), tiles))


def split_rows(n_queries: int, n_rows: int, cfg: dict, device: torch.device, splits: int | None = None):
    """(grid, rows per split) of a (query blocks, database splits) launch: whole BLOCK_N tiles per split, so
    every split but the last is full and none is empty. `splits` overrides database_splits' choice."""
    splits = splits or database_splits(n_queries, n_rows, cfg["BLOCK_M"], cfg["BLOCK_N"], device)
    per_split = triton.cdiv(triton.cdiv(n_rows, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    return (triton.cdiv(n_queries, cfg["BLOCK_M"]), triton.cdiv(n_rows, per_split)), per_split


def decode(keys: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 scores, int64 ids) from the kernel's keys."""
    hi = (keys >> 32).to(torch.int32)
    scores = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return (0.0 - scores if metric == "l2" else scores), keys & 0xFFFFFFFF  # 0 - s: no -0.0
