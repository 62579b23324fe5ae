"""Forward of the nested linear cross-entropy: every dim's log-sum-exp in one walk over the features.

A program owns BLOCK_M rows and one split of the classes. For each class tile it walks the feature dim
once. Shared head: the accumulator starts from the bias (logits_start) and is cut at every nesting
boundary, so it equals logits_j exactly where a piece ends at m_j and is folded there into dim j's online
log-sum-exp. The pieces come from a `ChunkPlan`: below `k_start` a small table of chunks (cut at the
boundaries there, e.g. 8, 16, 32 of the paper's dims; with TMA, 16-wide boxes, see box_chunks); from
`k_start` on, whole BLOCK_K tiles, since every boundary there falls on a tile end, in software-pipelined
runs. Per-dim heads: one masked K loop per head. No logits reach memory. The fold state (running max and
sum of exps per row and dim) lives in registers and is stored once per class split; splits are combined
afterwards in a fixed order: deterministic, no locks. The target logits and label-smoothing sums are
O(N * D) prefix dots outside the kernel (prefix_dots), so a fold is a max, an exp2 and a sum.

On sm_90 with 16-bit inputs whose rows are whole 16 bytes, the shared head loads its tiles through tensor
descriptors (TMA): 128 x 128 tiles, 64 x 128 wgmma, 126 registers (two CTAs per SM); elsewhere pointer
loads (launch_config).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .._nesting import nesting
from .indexing import row_offsets
from .launch import split_launch_options

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)); exp2 is the fast hardware unit
# Columns of the chunk table: first column, end column, first weight column, and the caller's index of
# the dim whose logits are complete at the chunk's end (-1 where none is).
CHUNK_FIELDS = tl.constexpr(4)
# Columns of bias_columns' table: the bias, then zeros up to the K of one 16-bit MMA.
BIAS_FIELDS = tl.constexpr(16)


@triton.jit
def chunk_product(acc, x_rows, w_rows, row_ok, cls_ok, CHUNKS, chunk, SIGN: tl.constexpr,
                  K_ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + SIGN * x[rows, k0:k1] @ W[cls, w0 + (k0:k1)]^T for chunk (k0, k1, w0) of the table.
    Also returns the loaded x and W tiles, which the backward reuses."""
    k0 = tl.multiple_of(tl.load(CHUNKS + chunk * CHUNK_FIELDS), K_ALIGN)
    k1 = tl.load(CHUNKS + chunk * CHUNK_FIELDS + 1)
    w0 = tl.multiple_of(tl.load(CHUNKS + chunk * CHUNK_FIELDS + 2), K_ALIGN)
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < k1
    xt = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    wt = tl.load(w_rows + (w0 - k0 + cols)[None, :], mask=cls_ok[:, None] & col_ok[None, :], other=0.0)
    if SIGN > 0:
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    else:
        acc -= tl.dot(xt, tl.trans(wt), input_precision=PRECISION)
    return acc, xt, wt, cols, col_ok, w0 - k0


@triton.jit
def logits_start(BIAS_COLS, BIAS_DESC, head_row, cls0, TMA: tl.constexpr, DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The logits accumulator's start for classes cls0 + [0, BLOCK_N) of the head whose rows of BIAS_COLS start
    at head_row: each class's bias, -inf past the last class (see bias_columns), so the accumulator holds
    finished logits at every boundary and the folds add nothing. One K=16 product of a ones column with the
    bias column (exact: 1 * b in fp32): a [BLOCK_N] vector broadcast onto the tile instead would live in the
    MMA layout at a register per column (AOT sm_90, 16-bit shared head: 204 registers that way, 128 this way)."""
    if TMA:
        bias_cols = BIAS_DESC.load([head_row + cls0, 0])
    else:
        rows = row_offsets(head_row + cls0 + tl.arange(0, BLOCK_N), BIAS_FIELDS)
        bias_cols = tl.load(BIAS_COLS + rows[:, None] + tl.arange(0, BIAS_FIELDS)[None, :])
    first = tl.arange(0, BIAS_FIELDS) == 0
    ones = tl.where(first[None, :], 1.0, tl.zeros([BLOCK_M, BIAS_FIELDS], tl.float32)).to(DTYPE)
    return tl.dot(ones, tl.trans(bias_cols), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), input_precision=PRECISION)


@triton.jit
def head_tiles(x_rows, w_rows, row_ok, cls_ok, k, m, w0, kk):
    """x[rows, k:k+BLOCK_K] and W[cls, w0 + (k:k+BLOCK_K)] of a per-dim head of m columns, masked at m."""
    col_ok = k + kk < m
    xt = tl.load(x_rows + (k + kk)[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    wt = tl.load(w_rows + (w0 + k + kk)[None, :], mask=cls_ok[:, None] & col_ok[None, :], other=0.0)
    return xt, wt, col_ok


@triton.jit
def head_logits(acc, x_rows, w_rows, row_ok, cls_ok, HEADS, head, K_ALIGN: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """(acc + logits tile, m, w0) of per-dim head `head` (HEADS rows: m, first weight column, caller's index)."""
    m = tl.load(HEADS + 3 * head)
    w0 = tl.multiple_of(tl.load(HEADS + 3 * head + 1), K_ALIGN)
    kk = tl.arange(0, BLOCK_K)
    for k in range(0, m, BLOCK_K):
        xt, wt, _ = head_tiles(x_rows, w_rows, row_ok, cls_ok, k, m, w0, kk)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    return acc, m, w0


@triton.jit
def fold_into_lse(z, dim, run_max, run_sum, dim_col):
    """Fold the finished logits tile z of dim `dim` into the online log-sum-exp state. run_max / run_sum are
    [BLOCK_M, DIMS_PAD] register tensors, one column per dim: a fold selects its column with a compare instead
    of loading and storing state in memory. The tile's own max and sum come first and are merged after, so
    the pass over the tile does not wait on the state."""
    tile_max = tl.max(z, axis=1)
    tile_sum = tl.sum(tl.exp2((z - tile_max[:, None]) * LOG2E), axis=1)
    here = dim_col[None, :] == dim
    old_max = tl.max(tl.where(here, run_max, float("-inf")), axis=1)
    old_sum = tl.sum(tl.where(here, run_sum, 0.0), axis=1)
    new_max = tl.maximum(old_max, tile_max)
    new_sum = old_sum * tl.exp2((old_max - new_max) * LOG2E) + tile_sum * tl.exp2((tile_max - new_max) * LOG2E)
    return tl.where(here, new_max[:, None], run_max), tl.where(here, new_sum[:, None], run_sum)


@triton.jit
def nested_lse_forward_kernel(
    X, W, BIAS_COLS, PART, CHUNKS, SEGMENTS, FOLD_AT, HEADS, X_DESC, W_DESC, X_BOX_DESC, W_BOX_DESC, BIAS_DESC,
    n_rows, n_classes, n_dims, n_chunks, n_segments, k_start, k_end, classes_per_split, classes_padded,
    stride_x, stride_w, stride_part,
    SHARED: tl.constexpr,
    TMA: tl.constexpr,        # shared head: loads by tensor descriptors (TMA on sm_90), else pointer loads
    BOX: tl.constexpr,        # with TMA, the width of the boxes below k_start (see box_chunks)
    K_ALIGN: tl.constexpr,    # every chunk start is a multiple of this: lets pointer loads be vectorized
    PRECISION: tl.constexpr,  # tl.dot precision: "ieee" keeps fp32 inputs exact, else tensor cores
    DIMS_PAD: tl.constexpr,   # n_dims rounded up to a power of two: the columns of the fold state
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    x_rows = X + row_offsets(rows, stride_x)[:, None]
    kk = tl.arange(0, BLOCK_K)
    dim_col = tl.arange(0, DIMS_PAD)
    run_max = tl.full([BLOCK_M, DIMS_PAD], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M, DIMS_PAD], tl.float32)
    # A loop bound taken from program_id breaks the interpreter, so every split walks classes_per_split
    # (whole tiles); the last split skips its tiles past the end.
    c_begin = tl.program_id(1) * classes_per_split
    for c0 in range(0, classes_per_split, BLOCK_N):
        cls0 = c_begin + c0
        if cls0 < n_classes:
            cls = cls0 + tl.arange(0, BLOCK_N)
            cls_ok = cls < n_classes
            w_rows = W + row_offsets(cls, stride_w)[:, None]
            if SHARED:
                acc = logits_start(BIAS_COLS, BIAS_DESC, 0, cls0, TMA, X.dtype.element_ty, PRECISION, BLOCK_M, BLOCK_N)
                for chunk in range(n_chunks):  # below k_start: chunks that end at every boundary
                    if TMA:  # a box at k0, after restarting the accumulator where the table says so
                        if tl.load(CHUNKS + chunk * CHUNK_FIELDS + 1) != 0:
                            acc = logits_start(BIAS_COLS, BIAS_DESC, 0, cls0, TMA, X.dtype.element_ty, PRECISION,
                                               BLOCK_M, BLOCK_N)
                        k0 = tl.load(CHUNKS + chunk * CHUNK_FIELDS)
                        acc = tl.dot(X_BOX_DESC.load([row0, k0]), tl.trans(W_BOX_DESC.load([cls0, k0])), acc,
                                     input_precision=PRECISION)
                    else:
                        acc = chunk_product(acc, x_rows, w_rows, row_ok, cls_ok, CHUNKS, chunk, 1.0, K_ALIGN, BLOCK_K,
                                            PRECISION)[0]
                    dim = tl.load(CHUNKS + chunk * CHUNK_FIELDS + 3)
                    if dim >= 0:
                        run_max, run_sum = fold_into_lse(acc, dim, run_max, run_sum, dim_col)
                if TMA:
                    for seg in range(n_segments):  # whole tiles, in runs that end at a boundary
                        for k in range(tl.load(SEGMENTS + 3 * seg), tl.load(SEGMENTS + 3 * seg + 1), BLOCK_K):
                            # rows and classes past the end read as zeros
                            acc = tl.dot(X_DESC.load([row0, k]), tl.trans(W_DESC.load([cls0, k])), acc,
                                         input_precision=PRECISION)
                        # Folding after the run keeps the fold out of the software-pipelined loop.
                        run_max, run_sum = fold_into_lse(acc, tl.load(SEGMENTS + 3 * seg + 2), run_max, run_sum,
                                                         dim_col)
                else:  # one loop over the whole tiles: the pipeliner leaves the nested runs above unpipelined
                    for k in range(k_start, k_end, BLOCK_K):
                        xt = tl.load(x_rows + (k + kk)[None, :], mask=row_ok[:, None], other=0.0)
                        wt = tl.load(w_rows + (k + kk)[None, :], mask=cls_ok[:, None], other=0.0)
                        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
                        dim = tl.load(FOLD_AT + (k - k_start) // BLOCK_K)
                        if dim >= 0:
                            run_max, run_sum = fold_into_lse(acc, dim, run_max, run_sum, dim_col)
            else:
                for head in range(n_dims):
                    dim = tl.load(HEADS + 3 * head + 2)
                    acc = logits_start(BIAS_COLS, BIAS_DESC, dim * classes_padded, cls0, False, X.dtype.element_ty,
                                       PRECISION, BLOCK_M, BLOCK_N)
                    acc = head_logits(acc, x_rows, w_rows, row_ok, cls_ok, HEADS, head, K_ALIGN, BLOCK_K, PRECISION)[0]
                    run_max, run_sum = fold_into_lse(acc, dim, run_max, run_sum, dim_col)
    # PART is [splits, 2, n_rows, n_dims]: the state is stored once, into this split's slice.
    part = (PART + tl.program_id(1).to(tl.int64) * 2 * stride_part + row_offsets(rows, n_dims)[:, None]
            + dim_col[None, :])
    keep = row_ok[:, None] & (dim_col < n_dims)[None, :]
    tl.store(part, run_max, mask=keep)
    tl.store(part + stride_part, run_sum, mask=keep)


@dataclass
class ChunkPlan:
    """How the kernels walk the feature columns (see the module docstring).
    chunks: int32 [n, 4] (first column, end column, first weight column, dim folded at the end or -1), the
    shared head's columns below k_start; with TMA boxes instead (box start, restart flag, 0, dim folded after
    the box or -1), see box_chunks; fold_at: int32, per whole tile from k_start to k_end, the dim folded at its
    end or -1; segments: int32 [n, 3] (first column, end column, dim folded at the end), the same whole tiles
    in runs that end at a boundary; heads: int32 [len(dims), 3] (m, first weight column, caller's index)
    ascending, the per-dim heads (concatenated along columns in the caller's order); k_align: what every
    (pointer) chunk start is a multiple of; boxes_aligned: whether every TMA box starts on whole 16 bytes of
    16-bit values, as Triton's descriptor loads require (always True without boxes)."""
    chunks: torch.Tensor
    fold_at: torch.Tensor
    segments: torch.Tensor
    heads: torch.Tensor
    k_start: int
    k_end: int
    k_align: int
    boxes_aligned: bool


def box_chunks(dims, k_start: int, box: int) -> list:
    """The shared head's columns below k_start as `box`-wide TMA boxes, with no masks: rows (box start, restart,
    0, dim folded after the box or -1). The accumulator reaches each boundary t below k_start (and k_start) by
    extending the previous prefix with whole boxes where t is a whole number of boxes past it; otherwise it
    restarts and covers [0, t) with boxes that end at t, the first starting at a negative column, which TMA
    reads as zeros (paper dims: 8 = one box at -8, 16 = restart at 0, 32 and 64 extend; 5 boxes for 64
    columns). A box never holds a column past its boundary, so no mask is needed and nothing from a larger
    dim's columns (not even an inf or NaN) reaches a smaller dim's logits."""
    geo = nesting(dims)
    targets = [(dims[j], j) for j in geo.order if dims[j] <= k_start]
    if k_start and (not targets or targets[-1][0] != k_start):
        targets.append((k_start, -1))
    rows, reached = [], 0
    for t, j in targets:
        restart = (t - reached) % box != 0
        starts = range(t - box * -(-t // box) if restart else reached, t, box)
        rows += [(k0, int(restart and i == 0), 0, j if k0 + box == t else -1) for i, k0 in enumerate(starts)]
        reached = t
    return rows


def chunk_plan(dims, shared: bool, block_k: int, device, box: int | None = None) -> ChunkPlan:
    """The plan for K tiles of block_k; with `box`, the chunks below k_start are TMA boxes (box_chunks)."""
    geo = nesting(dims)
    order = geo.order
    heads = [(dims[j], geo.offsets[j], j) for j in order]
    k_end = max(dims)
    # Whole tiles start past the last boundary that is not a tile multiple.
    ragged = [m for m in dims if m % block_k]
    k_start = min(k_end, -(-max(ragged) // block_k) * block_k) if ragged and shared else 0
    chunks, k = [], 0
    for j in order if shared else ():
        while k < min(dims[j], k_start):
            end = min(k + block_k, dims[j], k_start)
            chunks.append((k, end, k, j if end == dims[j] else -1))
            k = end
    fold_at = [next((j for j in order if dims[j] == t + block_k), -1) for t in range(k_start, k_end, block_k)]
    if not shared:
        k_start = k_end = 0
        fold_at = []
    ends = [(k_start + (t + 1) * block_k, j) for t, j in enumerate(fold_at) if j >= 0]
    segments = [(lo, hi, j) for lo, (hi, j) in zip([k_start] + [hi for hi, _ in ends], ends)]
    k_align = 16  # chunk starts and per-dim head offsets are all multiples of this
    while any(v % k_align for v in [c[0] for c in chunks] + [c[2] for c in chunks] + [h[1] for h in heads]):
        k_align //= 2
    if box and shared:
        chunks = box_chunks(dims, k_start, box)
    boxes_aligned = not (box and shared) or all(k0 % 8 == 0 for k0, *_ in chunks)
    as_tensor = lambda rows, width: torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, width)  # noqa: E731
    return ChunkPlan(as_tensor(chunks, CHUNK_FIELDS.value), as_tensor(fold_at, 1)[:, 0], as_tensor(segments, 3),
                     as_tensor(heads, 3), k_start, k_end, k_align, boxes_aligned)


def launch_config(dtype: torch.dtype, backward: bool = False, tma: bool = False) -> dict:
    """Tiles for a launch; the AOT compile test compiles exactly these and checks their sm_90 register and spill
    report (tests/test_aot.py). 16-bit inputs:
    - forward with TMA loads: 128 x 128 x 64, 8 warps, 3 stages (each warpgroup's wgmma is 64 x 128; with no
      load addresses or masks in registers it fits 128 registers, two CTAs per SM); with pointer loads
      64 x 64 x 64 (at 64 x 128 the addresses and masks took 174-248 registers, here 90-128). Capped at 128
      registers: Triton 3.6 stays under the cap unasked, 3.9 took 166 for the TMA variant uncapped and fits
      the cap without spills.
    - backward with TMA (nested_ce_backward_tma): 64 x 64 x 64, 4 warps, 3 stages, capped at 232 registers
      (uncapped 244, no spills either way; 128-row or 128-class tiles spilled 136-2068 B); with pointer loads
      32 x 32 x 32 under the same cap (64-wide tiles spilled 16-1264 B).
    fp32 runs the exact (non tensor-core) dot, whose operands live in registers, unpipelined: forward
    64 x 32 x 16, 4 warps; backward 16 x 16 x 16, 4 warps (every larger tile of the shared-head walk spilled,
    even at 1-2 warps: fp32 training on a GPU wants bf16 autocast, or the torch backend's cuBLAS matmuls)."""
    if dtype == torch.float32:
        block_m, block_n, block_k = (16, 16, 16) if backward else (64, 32, 16)
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 1,
                "PRECISION": "ieee"}
    if backward:
        block = 64 if tma else 32
        return {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": block, "num_warps": 4, "num_stages": 3,
                "maxnreg": 232, "PRECISION": "tf32"}
    block_m, block_n = (128, 128) if tma else (64, 64)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
            "maxnreg": 128, "PRECISION": "tf32"}


# With TMA, the shared head's columns below k_start are loaded in boxes this wide (box_chunks): the K of one
# 16-bit wgmma, and 32 bytes (TMA boxes are whole multiples of 16 bytes).
TMA_BOX = 16


def use_tma(*tensors: torch.Tensor) -> bool:
    """Whether whole tiles can be loaded through tensor descriptors: 16-bit 2-D row-major tensors whose base
    and row stride are multiples of 16 bytes (TMA's rules), on sm_90 or later; the CPU interpreter emulates
    descriptors, so the tests run this path too."""
    for t in tensors:
        if t.dtype == torch.float32 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 \
                or t.data_ptr() % 16:
            return False
    device = tensors[0].device
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def class_splits(n_rows: int, n_classes: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Enough class splits for about two programs per multiprocessor; never an empty split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(n_rows, block_m)), triton.cdiv(n_classes, block_n)))


def bias_columns(bias, n_heads: int, n_classes: int, block_n: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """[n_heads * C_pad, BIAS_FIELDS] in the inputs' dtype, C_pad = C rounded up to whole class tiles: head h's
    class c at row h * C_pad + c holds its bias (0 without bias) in column 0 and zeros after; the padding rows
    hold -inf, so a class past the end starts its logits at -inf (logits_start)."""
    padded = triton.cdiv(n_classes, block_n) * block_n
    cols = torch.zeros((n_heads, padded, BIAS_FIELDS.value), dtype=dtype, device=device)
    cols[:, n_classes:, 0] = float("-inf")
    if bias is not None:
        cols[:, :n_classes, 0] = bias.to(dtype)
    return cols.view(n_heads * padded, BIAS_FIELDS.value)


def lse_partials(x, w, bias, dims, shared, splits=None):
    """Runs the kernel: [splits, 2, N, len(dims)] fp32 partials (running max, sum of exps) per class split,
    row and dim (caller's order). `splits` overrides the number of class splits."""
    n_rows, n_classes = x.shape[0], w.shape[0]
    tma = shared and use_tma(x, w)
    cfg = launch_config(x.dtype, tma=tma)
    plan = chunk_plan(dims, shared, cfg["BLOCK_K"], x.device, box=TMA_BOX if tma else None)
    if not plan.boxes_aligned:  # e.g. ViT's 12, 24, 48: the pointer path
        cfg = launch_config(x.dtype, tma=(tma := False))
        plan = chunk_plan(dims, shared, cfg["BLOCK_K"], x.device)
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    splits = splits or class_splits(n_rows, n_classes, block_m, block_n, x.device)
    # Whole class tiles per split, so every split but the last is full and none is empty.
    per_split = triton.cdiv(triton.cdiv(n_classes, splits), block_n) * block_n
    splits = triton.cdiv(n_classes, per_split)
    part = torch.empty((splits, 2, n_rows, len(dims)), dtype=torch.float32, device=x.device)
    bias_cols = bias_columns(bias, 1 if shared else len(dims), n_classes, block_n, x.dtype, x.device)
    descriptors = [None] * 5
    if tma:
        descriptors = [TensorDescriptor.from_tensor(t, [rows, cols]) for t, rows, cols in
                       ((x, block_m, block_k), (w, block_n, block_k), (x, block_m, TMA_BOX), (w, block_n, TMA_BOX),
                        (bias_cols, block_n, BIAS_FIELDS.value))]
    grid = (triton.cdiv(n_rows, block_m), splits)
    nested_lse_forward_kernel[grid](
        x, w, bias_cols, part, plan.chunks, plan.segments, plan.fold_at, plan.heads, *descriptors, n_rows, n_classes,
        len(dims), plan.chunks.shape[0], plan.segments.shape[0], plan.k_start, plan.k_end, per_split,
        triton.cdiv(n_classes, block_n) * block_n,
        x.stride(0), w.stride(0), n_rows * len(dims), SHARED=shared, TMA=tma, BOX=TMA_BOX, K_ALIGN=plan.k_align,
        DIMS_PAD=triton.next_power_of_2(len(dims)), **cfg)
    return part


def prefix_dots(x, v, dims, shared):
    """[N, len(dims)] fp32: row r's dot of x[r, :m_j] with v's row r (or v's only row) over dim j's columns (the
    shared head's first m_j, or head j's block of the per-dim layout). O(N * D) in row chunks of bounded size:
    the target logits (v = W[target]) and the label-smoothing logit sums (v = column sums of W)."""
    geo = nesting(dims)
    out = torch.empty((x.shape[0], len(dims)), dtype=torch.float32, device=x.device)
    step = max(1, (32 << 20) // (4 * v.shape[1]))
    for r0 in range(0, x.shape[0], step):
        xs = x[r0:r0 + step].float()
        vs = v[r0:r0 + step].float() if v.shape[0] > 1 else v.float()
        if shared:
            cols = torch.stack([(xs[:, a:b] * vs[:, a:b]).sum(1) for a, b in geo.segments], 1).cumsum(1)
            out[r0:r0 + step, list(geo.order)] = cols
        else:
            for j, m in enumerate(dims):
                out[r0:r0 + step, j] = (xs[:, :m] * vs[:, geo.offsets[j]:geo.offsets[j] + m]).sum(1)
    return out


def nested_ce_forward_triton(x, w, bias, target, dims, shared, ignore_index, label_smoothing, splits=None):
    """(per-row losses, LSEs), [N, len(dims)] fp32, columns in the caller's order; ignored rows have loss 0.
    Layout of w / bias as in ops/nested_ce.py. The kernel computes the log-sum-exps; the target logits and
    the label-smoothing sums are O(N * D) prefix dots, outside the kernel's hot loop."""
    x, w = x.contiguous(), w.contiguous()
    run_max, run_sum = lse_partials(x, w, bias, dims, shared, splits).unbind(1)
    top = run_max.max(0).values
    lse = top + (run_sum * (run_max - top).exp()).sum(0).log()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    tgt_logit = prefix_dots(x, w[safe_target], dims, shared)
    if bias is not None:
        tgt_logit += bias.float()[:, safe_target].T if not shared else bias.float()[0, safe_target][:, None]
    losses = lse - (1 - label_smoothing) * tgt_logit
    if label_smoothing:
        logit_sum = prefix_dots(x, w.sum(0, keepdim=True, dtype=torch.float32), dims, shared)
        if bias is not None:
            logit_sum += bias.float().sum(1)[None, :] if not shared else bias.float().sum()
        losses -= label_smoothing / w.shape[0] * logit_sum
    return torch.where(valid[:, None], losses, torch.zeros_like(losses)), lse


# The launches compiled ahead of time: every dtype and head kind at the paper's dims, odd dims in bf16.
AOT_DIMS = {"paper": (8, 16, 32, 64, 128, 256, 512, 1024, 2048), "odd": (17, 3, 70)}


def aot_launches(backward: bool = False):
    """(label, dtype, constexprs, options) for the AOT check."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for label, dims in AOT_DIMS.items():
            if label == "paper" or dtype == torch.bfloat16:
                for shared in (True, False):
                    constexprs, options = split_launch_options(launch_config(dtype, backward))
                    constexprs.update(SHARED=shared, HAS_BIAS=True,
                                      K_ALIGN=chunk_plan(dims, shared, constexprs["BLOCK_K"], "cpu").k_align)
                    yield (f"{str(dtype)[6:]}-{label}-{'shared' if shared else 'per_dim'}", dtype, constexprs,
                           options)


def aot_specs():
    """The shipped launches, with pointer loads; 16-bit shared heads at the paper's dims also with TMA loads
    (sm_90 only: use_tma)."""
    from .aot import pointer

    names = ("X_DESC", "W_DESC", "X_BOX_DESC", "W_BOX_DESC", "BIAS_DESC")
    for label, dtype, constexprs, _ in aot_launches():
        dims = AOT_DIMS[label.split("-")[1]]
        variants = [(label, False, {})]
        if constexprs["SHARED"] and dtype != torch.float32 and label.split("-")[1] == "paper":
            variants.append((f"{label}-tma", True, {"min_arch": 90}))
        for name, tma, only in variants:
            consts, opts = split_launch_options(launch_config(dtype, tma=tma))
            opts.update(only)
            consts.update(SHARED=constexprs["SHARED"], TMA=tma, BOX=TMA_BOX, K_ALIGN=constexprs["K_ALIGN"],
                          DIMS_PAD=triton.next_power_of_2(len(dims)))
            m, n, k, elem = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"], pointer(dtype)[1:]
            boxes = ((m, k), (n, k), (m, TMA_BOX), (n, TMA_BOX), (n, BIAS_FIELDS.value))
            descriptors = {name: f"tensordesc<{elem}[{rows}, {cols}]>" for name, (rows, cols) in zip(names, boxes)}
            if not tma:
                descriptors = dict.fromkeys(names, "constexpr")
                consts.update(dict.fromkeys(names))
            signature = {"X": pointer(dtype), "W": pointer(dtype), "BIAS_COLS": pointer(dtype), "PART": "*fp32",
                         "CHUNKS": "*i32", "SEGMENTS": "*i32", "FOLD_AT": "*i32", "HEADS": "*i32", **descriptors,
                         "n_rows": "i32", "n_classes": "i32", "n_dims": "i32", "n_chunks": "i32", "n_segments": "i32",
                         "k_start": "i32", "k_end": "i32",
                         "classes_per_split": "i32", "classes_padded": "i32", "stride_x": "i32", "stride_w": "i32",
                         "stride_part": "i32"}
            signature.update({c: "constexpr" for c in consts if c not in signature})
            yield name, nested_lse_forward_kernel, signature, consts, opts
