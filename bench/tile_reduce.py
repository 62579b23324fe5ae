"""Two ways for many programs to add fp32 tiles into one tensor, for the GPU microbenchmark of
bench/nested_ce_gpu.py (issue 9: whether the fused backward can accumulate dX and dW by bulk tile reductions):

  tile_atomic_add_kernel  one relaxed tl.atomic_add per element (RED.E.ADD.F32 on sm_80/sm_90): what the
                          shipped nested-CE backward does;
  tile_tma_add_kernel     one tensor-descriptor atomic_add per tile, which compiles on sm_90 to a single bulk
                          asynchronous reduction (cp.reduce.async.bulk.tensor ... add.f32) of the whole tile.

Program p adds the constant (p % 7 + 1) to every element of tile p % n_tiles of OUT [n_rows, n_cols] (row-
major tiles of BLOCK_M x BLOCK_N), so the expected result is known in closed form (expected_sums).
"""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_origin(n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, n_tiles):
    tile = tl.program_id(0) % n_tiles
    tiles_per_row = n_cols // BLOCK_N
    return (tile // tiles_per_row) * BLOCK_M, (tile % tiles_per_row) * BLOCK_N


@triton.jit
def tile_atomic_add_kernel(OUT, n_rows, n_cols, n_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    r0, c0 = _tile_origin(n_cols, BLOCK_M, BLOCK_N, n_tiles)
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = c0 + tl.arange(0, BLOCK_N)
    value = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32) * (tl.program_id(0) % 7 + 1).to(tl.float32)
    ptrs = OUT + rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.atomic_add(ptrs, value, sem="relaxed")


@triton.jit
def tile_tma_add_kernel(OUT, n_rows, n_cols, n_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    r0, c0 = _tile_origin(n_cols, BLOCK_M, BLOCK_N, n_tiles)
    value = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32) * (tl.program_id(0) % 7 + 1).to(tl.float32)
    desc = tl.make_tensor_descriptor(OUT, shape=[n_rows, n_cols], strides=[n_cols, 1], block_shape=[BLOCK_M, BLOCK_N])
    desc.atomic_add([r0, c0], value)


KERNELS = {"atomic": tile_atomic_add_kernel, "tma": tile_tma_add_kernel}


def add_tiles(out: torch.Tensor, programs: int, kind: str, block_m: int = 128, block_n: int = 64) -> None:
    """Launches `programs` programs of the `kind` kernel on `out` (fp32, [n_rows, n_cols], whole tiles)."""
    n_rows, n_cols = out.shape
    if out.dtype != torch.float32 or not out.is_contiguous() or n_rows % block_m or n_cols % block_n:
        raise ValueError(f"out must be contiguous fp32 of whole {block_m} x {block_n} tiles, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if kind == "tma" and out.is_cuda:
        _install_scratch_allocator(out.device)
    n_tiles = (n_rows // block_m) * (n_cols // block_n)
    KERNELS[kind][(programs,)](out, n_rows, n_cols, n_tiles, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)


@functools.cache
def _install_scratch_allocator(device: torch.device) -> None:
    """In-kernel descriptors need a global scratch buffer on the GPU: installed once, not on every (timed) call."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))


def per_tile(out: torch.Tensor, block_m: int = 128, block_n: int = 64) -> torch.Tensor:
    """[n_tiles, block_m * block_n] float64 on the CPU: out's elements tile by tile, in add_tiles' tile order."""
    n_rows, n_cols = out.shape
    tiles = out.detach().cpu().double().reshape(n_rows // block_m, block_m, n_cols // block_n, block_n)
    return tiles.permute(0, 2, 1, 3).reshape(-1, block_m * block_n)


def expected_sums(n_tiles: int, programs: int) -> torch.Tensor:
    """[n_tiles] float64: what add_tiles adds to every element of each tile."""
    p = torch.arange(programs, dtype=torch.float64)
    return torch.zeros(n_tiles, dtype=torch.float64).index_add_(0, (p % n_tiles).long(), p % 7 + 1)
