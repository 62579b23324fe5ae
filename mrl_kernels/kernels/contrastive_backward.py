"""Backward of the nested contrastive loss: owner-computes, deterministic (no atomics).

One kernel, launched twice with the roles swapped: rows = queries, columns = docs gives dq and rho; rows = docs,
columns = queries gives dd and kappa (Z is the same number either way, see contrastive_forward). A program owns
BLOCK_M rows and sweeps every column tile; its rows' fp32 gradient and rho are written by it alone.

Without the one-hot target terms (added outside, O(B * D), see ops/contrastive_triton.py), dL/dZ_j is
    P_j[r, c] = u_j[r] exp(Z_j[r, c] - U_j[r]) + v_j[c] exp(Z_j[r, c] - V_j[c])
(the softmax of r's row over the columns, and of c's column over the rows; the launcher passes each term's
coefficient and LSE, +inf where a row or column has no such term). For each column tile the dims are taken
largest first, each recomputing S_j from column 0 (never by subtracting segments from S_J: with per-prefix
normalisation a small prefix's scale amplifies that cancellation error, e.g. 1e12 for an all-zero prefix); the
segment gradient G_s = sum_{j >= s} P_j * row_scale_j * col_scale_j is a suffix sum held in registers, and
    DX[rows, seg_s] += G_s @ Y[cols, seg_s],   RHO[rows, j] += sum_c P_j * Z_j
(rho is the normalisation term's row sum; the launcher applies that term). Cost per column tile: sum_j m_j
columns of recompute and D of gradient product.
"""
import torch
import triton
import triton.language as tl

from .contrastive_forward import AOT_DIMS, bounds, pair_scale, prefix_product
from .indexing import row_offsets
from .launch import split_launch_options
from .nested_ce_forward import LOG2E


@triton.jit
def softmax_terms(STATS, idx, ok, j, n_dims):
    """(coefficient, LSE) of dim j for the indices idx of a [n, 2, n_dims] fp32 table; 0 and +inf where masked,
    so that the term is coefficient * exp(z - LSE) = 0 there."""
    at = STATS + row_offsets(idx, 2 * n_dims) + j
    return tl.load(at, mask=ok, other=0.0), tl.load(at + n_dims, mask=ok, other=float("inf"))


@triton.jit
def contrastive_grad_kernel(
    X, Y, ROW_SCALE, COL_SCALE, ROW_STATS, COL_STATS, DX, RHO, BOUNDS, n_rows, n_cols, n_dims, stride_x, stride_y,
    stride_dx,
    DIMS_PAD: tl.constexpr,   # n_dims rounded up to a power of two: the columns of the rho registers
    ROW_TERM: tl.constexpr,   # whether rows carry a softmax (u, U); False: u = 0 everywhere, skipped
    COL_TERM: tl.constexpr,   # whether columns carry a softmax (v, V)
    PRECISION: tl.constexpr,  # tl.dot precision: "ieee" keeps fp32 inputs exact; 16-bit inputs use tensor cores
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows  # rows past the end repeat the last row (no load masks) and store nothing
    x_rows = X + row_offsets(tl.minimum(rows, n_rows - 1), stride_x)[:, None]
    dx_rows = DX + row_offsets(rows, stride_dx)[:, None]
    dim_col = tl.arange(0, DIMS_PAD)
    rho = tl.zeros([BLOCK_M, DIMS_PAD], tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols  # columns past the end repeat the last one and get P = 0
        y_rows = Y + row_offsets(tl.minimum(cols, n_cols - 1), stride_y)[:, None]
        grad = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for back in range(n_dims):  # largest dim first: G_s is a suffix sum (a loop: see contrastive_forward)
            j = n_dims - 1 - back
            lo, hi = tl.load(BOUNDS + j), tl.load(BOUNDS + j + 1)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc = prefix_product(acc, x_rows, y_rows, 0, hi, PRECISION, BLOCK_K)
            scale = pair_scale(ROW_SCALE, COL_SCALE, rows, cols, row_ok, col_ok, j, n_dims)
            z = acc * scale
            p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if ROW_TERM:
                u, lse_u = softmax_terms(ROW_STATS, rows, row_ok, j, n_dims)
                p += u[:, None] * tl.exp2((z - lse_u[:, None]) * LOG2E)
            if COL_TERM:
                v, lse_v = softmax_terms(COL_STATS, cols, col_ok, j, n_dims)
                p += v[None, :] * tl.exp2((z - lse_v[None, :]) * LOG2E)
            p = tl.where(col_ok[None, :], p, 0.0)
            rho += tl.where(dim_col[None, :] == j, tl.sum(p * z, axis=1)[:, None], 0.0)
            grad += p * scale  # dZ_j / dS_j
            g = grad.to(Y.dtype.element_ty)  # 16-bit operands for the tensor cores; the launcher scales G
            for k in range(lo, hi, BLOCK_K):  # segment j, masked at its end
                kk = k + tl.arange(0, BLOCK_K)
                yt = tl.load(y_rows + kk[None, :], mask=(kk < hi)[None, :], other=0.0)
                dx_at = dx_rows + kk[None, :]
                dx_ok = row_ok[:, None] & (kk < hi)[None, :]
                tl.store(dx_at, tl.load(dx_at, mask=dx_ok) + tl.dot(g, yt, input_precision=PRECISION), mask=dx_ok)
    keep = row_ok[:, None] & (dim_col < n_dims)[None, :]
    tl.store(RHO + row_offsets(rows, n_dims)[:, None] + dim_col[None, :], rho, mask=keep)


def launch_config(dtype: torch.dtype) -> dict:
    """Tiles and warps of a launch; tests/test_aot.py compiles exactly these and checks their sm_90 report.
    16-bit: 64 x 64 x 32, 8 warps, 2 stages (sm_90, paper dims, both softmax terms: 221 registers, no spills; at
    4 warps, or capped at 168, it spilled). fp32 (exact dot, operands in registers, unpipelined): 32 x 32 x 16,
    4 warps (sm_90: 128 registers, no spills; sm_80 spills 16-24 B at some dims, 8 warps moved that elsewhere)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1, "PRECISION": "ieee"}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2, "PRECISION": "tf32"}


def softmax_stats(coef: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The [n, 2, len(dims)] fp32 table softmax_terms reads: each row's coefficients, then its LSEs."""
    return torch.stack([coef, lse], 1).float().contiguous()


def grad_rows(x, y, row_scale, col_scale, row_stats, col_stats, dims):
    """(dx [len(x), D] fp32, rho [len(x), len(dims)] fp32) of one orientation: dx[:, seg_s] = G_s @ y[:, seg_s]
    (zero past max(dims)) and rho_j = sum_c P_j * Z_j. row_stats / col_stats: softmax_stats tables of x's and y's
    rows, or None where that side has no softmax term."""
    cfg = launch_config(x.dtype)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    rho = torch.empty((x.shape[0], len(dims)), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(x.shape[0], cfg["BLOCK_M"]),)
    contrastive_grad_kernel[grid](
        x, y, row_scale.contiguous(), col_scale.contiguous(), row_stats if row_stats is not None else rho,
        col_stats if col_stats is not None else rho, dx, rho, bounds(dims, x.device), x.shape[0], y.shape[0],
        len(dims), x.stride(0), y.stride(0), dx.stride(0), DIMS_PAD=triton.next_power_of_2(len(dims)),
        ROW_TERM=row_stats is not None, COL_TERM=col_stats is not None, **cfg)
    return dx, rho


def aot_specs():
    """Every dtype at every AOT_DIMS entry with both softmax terms (the symmetric loss: the most registers),
    and bf16 with one term each (the one-way loss's two launches)."""
    from .aot import pointer  # the compiler module: imported by the AOT check only, not by a launch

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for label, dims in AOT_DIMS.items():
            terms = [(True, True)] + ([(True, False), (False, True)] if dtype == torch.bfloat16 else [])
            for row_term, col_term in terms:
                consts, options = split_launch_options(launch_config(dtype))
                consts.update(DIMS_PAD=triton.next_power_of_2(len(dims)), ROW_TERM=row_term, COL_TERM=col_term)
                signature = {"X": pointer(dtype), "Y": pointer(dtype), "ROW_SCALE": "*fp32", "COL_SCALE": "*fp32",
                             "ROW_STATS": "*fp32", "COL_STATS": "*fp32", "DX": "*fp32", "RHO": "*fp32",
                             "BOUNDS": "*i32", "n_rows": "i32", "n_cols": "i32", "n_dims": "i32", "stride_x": "i32",
                             "stride_y": "i32", "stride_dx": "i32"}
                signature.update({c: "constexpr" for c in consts})
                side = "both" if row_term and col_term else "rows" if row_term else "cols"
                yield f"{str(dtype)[6:]}-{label}-{side}", contrastive_grad_kernel, signature, consts, options
