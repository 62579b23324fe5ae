"""Forward of the nested contrastive loss: every dim's row log-sum-exp of the scaled prefix scores in one walk.

Z_j[r, c] = row_scale_j[r] * S_j[r, c] * col_scale_j[c], S_j = X[:, :m_j] @ Y[:, :m_j]^T. A program owns
BLOCK_M rows of X and sweeps the rows of Y in BLOCK_N tiles; for each tile it walks the features once, segment
by segment (segment ends from a runtime table: one compiled kernel serves every dims list), so the accumulator
holds S_j exactly at boundary m_j, where it is scaled and folded into dim j's online (max, sum of exps) state,
kept in registers for every dim. No score reaches memory.

Query rows (X = queries, Y = docs, scales a_j and b_j / temperature) give the row LSEs. The symmetric term's
column LSEs come from the same kernel with the roles swapped (X = docs[labels], Y = queries, scales b_j[labels]
and a_j / temperature): Z is the same number either way, the launch works with and without normalisation
(unnormalised scores have no bound that a fixed exp reference could rely on), needs no atomics and stays
deterministic, at the price of a second B x B walk (B/M of the first).
"""
import torch
import triton
import triton.language as tl

from .._nesting import nesting
from .indexing import row_offsets
from .launch import split_launch_options
from .nested_ce_forward import fold_into_lse  # the online (max, sum) fold, one column per dim



@triton.jit
def prefix_product(acc, x_rows, y_rows, lo, hi, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + X[rows, lo:hi] @ Y[cols, lo:hi]^T in BLOCK_K tiles, masked at hi (a nesting boundary), so no
    feature of a larger prefix reaches acc. The rows are clamped (see the kernels): no row or column masks."""
    for k in range(lo, hi, BLOCK_K):
        kk = k + tl.arange(0, BLOCK_K)
        xt = tl.load(x_rows + kk[None, :], mask=(kk < hi)[None, :], other=0.0)
        yt = tl.load(y_rows + kk[None, :], mask=(kk < hi)[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(yt), acc, input_precision=PRECISION)
    return acc


@triton.jit
def pair_scale(ROW_SCALE, COL_SCALE, rows, cols, row_ok, col_ok, j, n_dims):
    """row_scale_j[r] * col_scale_j[c] on the tile (Z_j = S_j times this); the scales are [n, n_dims] fp32,
    dims ascending."""
    a = tl.load(ROW_SCALE + row_offsets(rows, n_dims) + j, mask=row_ok, other=0.0)
    b = tl.load(COL_SCALE + row_offsets(cols, n_dims) + j, mask=col_ok, other=0.0)
    return a[:, None] * b[None, :]


@triton.jit
def contrastive_lse_kernel(
    X, Y, ROW_SCALE, COL_SCALE, LSE, BOUNDS, n_rows, n_cols, n_dims, stride_x, stride_y,
    DIMS_PAD: tl.constexpr,   # n_dims rounded up to a power of two: the columns of the fold state
    PRECISION: tl.constexpr,  # tl.dot precision: "ieee" keeps fp32 inputs exact; 16-bit inputs use tensor cores
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows  # rows past the end repeat the last row (no load masks) and are not stored
    x_rows = X + row_offsets(tl.minimum(rows, n_rows - 1), stride_x)[:, None]
    dim_col = tl.arange(0, DIMS_PAD)
    run_max = tl.full([BLOCK_M, DIMS_PAD], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M, DIMS_PAD], tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols  # columns past the end repeat the last one and score -inf: they add nothing
        y_rows = Y + row_offsets(tl.minimum(cols, n_cols - 1), stride_y)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # A loop over the dims (segment ends from BOUNDS), not tl.static_range: unrolled, every dim's row loads
        # and first-tile addresses were hoisted out of the column loop (sm_90: 255 registers and spills).
        for j in range(n_dims):
            acc = prefix_product(acc, x_rows, y_rows, tl.load(BOUNDS + j), tl.load(BOUNDS + j + 1), PRECISION,
                                 BLOCK_K)
            z = acc * pair_scale(ROW_SCALE, COL_SCALE, rows, cols, row_ok, col_ok, j, n_dims)
            run_max, run_sum = fold_into_lse(tl.where(col_ok[None, :], z, float("-inf")), j, run_max, run_sum,
                                             dim_col)
    keep = row_ok[:, None] & (dim_col < n_dims)[None, :]
    tl.store(LSE + row_offsets(rows, n_dims)[:, None] + dim_col[None, :], run_max + tl.log(run_sum), mask=keep)


def launch_config(dtype: torch.dtype) -> dict:
    """Tiles and warps of a launch; tests/test_aot.py compiles exactly these and checks their sm_90 report.
    16-bit: 64 x 64 x 32, 8 warps, 3 stages (sm_90, paper dims: 128 registers, no spills; 64-wide K tiles took
    225, 4 warps spilled). fp32 runs the exact (non tensor-core) dot with its operands in registers,
    unpipelined: 32 x 32 x 16, 4 warps (126 registers)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1, "PRECISION": "ieee"}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3, "PRECISION": "tf32"}


def row_lse(x, y, row_scale, col_scale, dims) -> torch.Tensor:
    """[len(x), len(dims)] fp32, dims ascending: LSE_c of row_scale_j[r] * (x[r, :m_j] . y[c, :m_j]) *
    col_scale_j[c] over all rows c of y. x and y have unit column stride; the scales are [n, len(dims)] fp32,
    dims ascending."""
    cfg = launch_config(x.dtype)
    lse = torch.empty((x.shape[0], len(dims)), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(x.shape[0], cfg["BLOCK_M"]),)
    contrastive_lse_kernel[grid](x, y, row_scale.contiguous(), col_scale.contiguous(), lse, bounds(dims, x.device),
                                 x.shape[0], y.shape[0], len(dims), x.stride(0), y.stride(0),
                                 DIMS_PAD=triton.next_power_of_2(len(dims)), **cfg)
    return lse


def bounds(dims, device) -> torch.Tensor:
    """int32 [len(dims) + 1]: 0 and the dims ascending, the segment ends the kernels walk."""
    return torch.tensor((0, *nesting(dims).ascending), dtype=torch.int32, device=device)


# The launches compiled ahead of time: the paper's dims, an embedding model's (64..768) and odd ones.
AOT_DIMS = {"paper": (8, 16, 32, 64, 128, 256, 512, 1024, 2048), "768": (64, 128, 256, 512, 768),
            "odd": (3, 17, 70)}


def aot_specs():
    """Every dtype at every AOT_DIMS entry, as row_lse launches them."""
    from .aot import pointer  # the compiler module: imported by the AOT check only, not by a launch

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for label, dims in AOT_DIMS.items():
            consts, options = split_launch_options(launch_config(dtype))
            consts.update(DIMS_PAD=triton.next_power_of_2(len(dims)))
            signature = {"X": pointer(dtype), "Y": pointer(dtype), "ROW_SCALE": "*fp32", "COL_SCALE": "*fp32",
                         "LSE": "*fp32", "BOUNDS": "*i32", "n_rows": "i32", "n_cols": "i32", "n_dims": "i32",
                         "stride_x": "i32", "stride_y": "i32"}
            signature.update({c: "constexpr" for c in consts})
            yield f"{str(dtype)[6:]}-{label}", contrastive_lse_kernel, signature, consts, options
