"""Prefix L2 norms: for each row of x and each nesting dim m, ||x[:m]||, in one pass over the row.

The squares are accumulated in an fp32 tile that is never reset; at each nesting boundary the tile
is reduced across its columns and stored, so one read of x[:, :max(dims)] serves every dim.
"""
import torch
import triton
import triton.language as tl

from .._nesting import nesting
from .indexing import row_offsets


@triton.jit
def prefix_norms_kernel(
    X, OUT, n_rows, stride_x, stride_out,
    NEST: tl.constexpr,     # nesting dims, ascending
    OUT_COL: tl.constexpr,  # output column of each entry of NEST (the caller's order)
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per load; segments shorter than this load a masked tile
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    x_rows = X + row_offsets(rows, stride_x)[:, None]
    out_rows = OUT + row_offsets(rows, stride_out)
    sumsq = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(len(NEST)):
        for start in tl.range(0 if j == 0 else NEST[j - 1], NEST[j], BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols[None, :] < NEST[j])
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sumsq += x * x
        tl.store(out_rows + OUT_COL[j], tl.sqrt(tl.sum(sumsq, axis=1)), mask=row_ok)


def launch_config(dtype: torch.dtype, dims) -> dict:
    """Tile sizes and warps for a launch. The AOT compile test compiles exactly these."""
    # 16-bit inputs move half the bytes per column, so a wider tile keeps the loads 16 bytes wide
    # per thread while the fp32 accumulator tile stays at 4096 elements (32 registers a thread).
    block_d = 128 if dtype == torch.float32 else 256
    block_d = min(block_d, triton.next_power_of_2(max(dims)))
    return {"BLOCK_N": 4096 // block_d, "BLOCK_D": block_d, "num_warps": 4}


def kernel_args(dims):
    """The constexpr tuples (NEST, OUT_COL) for a dims list in the caller's order."""
    geo = nesting(dims)
    return geo.ascending, geo.order


def prefix_norms_triton(x: torch.Tensor, dims, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, len(dims)] fp32 norms of x[:, :m], written into `out` when given.
    x: 2-D, unit column stride, fp32/fp16/bf16 (validated by the op)."""
    n_rows = x.shape[0]
    if out is None:
        out = torch.empty((n_rows, len(dims)), dtype=torch.float32, device=x.device)
    nest, out_col = kernel_args(dims)
    cfg = launch_config(x.dtype, dims)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_N"]),)
    prefix_norms_kernel[grid](x, out, n_rows, x.stride(0), out.stride(0), NEST=nest, OUT_COL=out_col, **cfg)
    return out


def aot_specs():
    """The launches to compile ahead of time: every dtype, at the paper's dims and at odd ones, with
    32-bit and 64-bit integer arguments (Triton specializes an int to i64 once it passes 2**31)."""
    from .aot import pointer  # the compiler module: imported by the AOT check only, not by a launch

    dim_sets = {"paper": (8, 16, 32, 64, 128, 256, 512, 1024, 2048), "odd": (17, 3, 100), "one": (1,)}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for label, dims in dim_sets.items():
            int_type = "i64" if label == "odd" else "i32"
            cfg = launch_config(dtype, dims)
            nest, out_col = kernel_args(dims)
            signature = {"X": pointer(dtype), "OUT": "*fp32", "n_rows": int_type, "stride_x": int_type,
                         "stride_out": "i32", "NEST": "constexpr", "OUT_COL": "constexpr", "BLOCK_N": "constexpr",
                         "BLOCK_D": "constexpr"}
            constexprs = {"NEST": nest, "OUT_COL": out_col, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": cfg["BLOCK_D"]}
            yield f"{dtype}-{label}", prefix_norms_kernel, signature, constexprs, {"num_warps": cfg["num_warps"]}
