"""Forward of the nested linear cross-entropy: every dim's log-sum-exp in one walk over the features.

A program owns BLOCK_M rows and one split of the classes. For each class tile it walks the feature
dim once (shared head: logits_j are the running partial sums, so the tile's accumulator is folded into
dim j's online log-sum-exp at each nesting boundary m_j; per-dim heads: one product per dim), so no
logits ever reach memory. Splits write partial (max, sum of exps, target logit, logit sum) per row and
dim, combined afterwards in a fixed order: deterministic, no locks.
"""
import torch
import triton
import triton.language as tl

from .aot import pointer
from .indexing import row_offsets

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)); exp2 is the fast hardware unit


@triton.jit
def select_col(state, jcol, j):
    """Column j of a [BLOCK_M, J_PAD] state tensor (Triton cannot index a register tensor)."""
    return tl.sum(tl.where(jcol == j, state, 0.0), axis=1)


@triton.jit
def head_logits(acc, x_rows, w_cols, row_ok, cls_ok, k_start, k_end, w_col0,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SIGN: tl.constexpr = 1.0):
    """acc + SIGN * x[rows, k_start:k_end] @ W[cls, w_col0 + (k_start:k_end)]^T, in fp32."""
    for k in tl.range(k_start, k_end, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        xt = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        wt = tl.load(w_cols + (w_col0 + cols)[:, None], mask=col_ok[:, None] & cls_ok[None, :], other=0.0)
        if SIGN > 0:
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        else:
            acc -= tl.dot(xt, wt, input_precision=PRECISION)
    return acc


@triton.jit
def nested_lse_forward_kernel(
    X, W, BIAS, TARGET, PART,
    n_rows, n_classes, classes_per_split, stride_x, stride_w, stride_bias, stride_part,
    NEST: tl.constexpr,       # nesting dims, ascending
    ORDER: tl.constexpr,      # caller's index of each entry of NEST (its output column and head row)
    OFFSETS: tl.constexpr,    # first weight column of each dim's head (per-dim heads), caller's order
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTHING: tl.constexpr,
    J_PAD: tl.constexpr,      # len(NEST) rounded up to a power of two: width of the per-dim state
    PRECISION: tl.constexpr,  # tl.dot precision: "ieee" keeps fp32 inputs exact, else tensor cores
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    x_rows = X + row_offsets(rows, stride_x)[:, None]
    target = tl.load(TARGET + rows, mask=row_ok, other=-1)
    jcol = tl.arange(0, J_PAD)[None, :]
    run_max = tl.full([BLOCK_M, J_PAD], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M, J_PAD], tl.float32)
    tgt_logit = tl.zeros([BLOCK_M, J_PAD], tl.float32)
    logit_sum = tl.zeros([BLOCK_M, J_PAD], tl.float32)
    # A loop bound taken from program_id breaks the interpreter, so every split walks classes_per_split
    # (whole tiles) and the tail of the last split is masked.
    c_begin = tl.program_id(1) * classes_per_split
    for c0 in range(0, classes_per_split, BLOCK_N):
        cls = c_begin + c0 + tl.arange(0, BLOCK_N)
        cls_ok = cls < n_classes
        w_cols = W + row_offsets(cls, stride_w)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for j in tl.static_range(len(NEST)):
            if SHARED:  # continue the running sum from the previous boundary
                acc = head_logits(acc, x_rows, w_cols, row_ok, cls_ok, 0 if j == 0 else NEST[j - 1], NEST[j], 0,
                                  BLOCK_K, PRECISION)
                z = acc
            else:
                z = head_logits(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), x_rows, w_cols, row_ok, cls_ok, 0,
                                NEST[j], OFFSETS[ORDER[j]], BLOCK_K, PRECISION)
            if HAS_BIAS:
                bias_row = BIAS + (0 if SHARED else ORDER[j]) * stride_bias
                z += tl.load(bias_row + cls, mask=cls_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.where(cls_ok[None, :], z, float("-inf"))
            col = jcol == ORDER[j]
            old_max = select_col(run_max, jcol, ORDER[j])
            new_max = tl.maximum(old_max, tl.max(z, axis=1))
            tile_sum = tl.sum(tl.exp2((z - new_max[:, None]) * LOG2E), axis=1)
            new_sum = select_col(run_sum, jcol, ORDER[j]) * tl.exp2((old_max - new_max) * LOG2E)
            run_max = tl.where(col, new_max[:, None], run_max)
            run_sum = tl.where(col, (new_sum + tile_sum)[:, None], run_sum)
            hit = (cls[None, :] == target[:, None]) & cls_ok[None, :]
            tgt_logit += tl.where(col, tl.sum(tl.where(hit, z, 0.0), axis=1)[:, None], 0.0)
            if SMOOTHING:
                logit_sum += tl.where(col, tl.sum(tl.where(cls_ok[None, :], z, 0.0), axis=1)[:, None], 0.0)
    # PART is [splits, 4, n_rows, J_PAD] fp32; padding columns are written and ignored.
    part = PART + tl.program_id(1).to(tl.int64) * 4 * stride_part + row_offsets(rows, J_PAD)[:, None] + jcol
    tl.store(part, run_max, mask=row_ok[:, None])
    tl.store(part + stride_part, run_sum, mask=row_ok[:, None])
    tl.store(part + 2 * stride_part, tgt_logit, mask=row_ok[:, None])
    tl.store(part + 3 * stride_part, logit_sum, mask=row_ok[:, None])


def kernel_args(dims, shared: bool):
    """Constexprs for a dims list in the caller's order: NEST (ascending), ORDER, OFFSETS, J_PAD."""
    order = tuple(sorted(range(len(dims)), key=lambda j: dims[j]))
    offsets = tuple(sum(dims[:j]) for j in range(len(dims))) if not shared else (0,) * len(dims)
    return {"NEST": tuple(dims[j] for j in order), "ORDER": order, "OFFSETS": offsets,
            "J_PAD": triton.next_power_of_2(len(dims))}


def launch_config(dtype: torch.dtype) -> dict:
    """Tiles for a launch; the AOT compile test compiles exactly these.
    128 classes x 64 rows per tile; K steps of 64 (16-bit) or 32 (fp32, twice the bytes per element)
    keep each pipeline stage at 24 KB of shared memory."""
    block_k = 32 if dtype == torch.float32 else 64
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 3,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def class_splits(n_rows: int, n_classes: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Enough class splits for about two programs per multiprocessor; never an empty split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(n_rows, block_m)), triton.cdiv(n_classes, block_n)))


def lse_partials(x, w, bias, target, dims, shared, label_smoothing, splits=None, out=None):
    """Runs the kernel: [splits, 4, N, J_PAD] fp32 partials (max, sum of exps, target logit, logit sum)
    per class split, row and dim (caller's order). `splits` overrides the number of class splits; `out`
    is a buffer of that shape to write into."""
    n_rows, n_classes = x.shape[0], w.shape[0]
    cfg = launch_config(x.dtype)
    consts = kernel_args(dims, shared)
    splits = splits or class_splits(n_rows, n_classes, cfg["BLOCK_M"], cfg["BLOCK_N"], x.device)
    # Whole class tiles per split, so every split but the last is full and none is empty.
    per_split = triton.cdiv(triton.cdiv(n_classes, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    splits = triton.cdiv(n_classes, per_split)
    shape = (splits, 4, n_rows, consts["J_PAD"])
    part = torch.empty(shape, dtype=torch.float32, device=x.device) if out is None else out
    if part.shape != shape or not part.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {shape}")
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), splits)
    nested_lse_forward_kernel[grid](
        x, w, bias if bias is not None else w, target, part,
        n_rows, n_classes, per_split, x.stride(0), w.stride(0), bias.stride(0) if bias is not None else 0,
        n_rows * consts["J_PAD"], SHARED=shared, HAS_BIAS=bias is not None, SMOOTHING=label_smoothing > 0,
        **consts, **cfg)
    return part


def nested_ce_forward_triton(x, w, bias, target, dims, shared, ignore_index, label_smoothing, splits=None):
    """(per-row losses, LSEs), [N, len(dims)] fp32, columns in the caller's order; ignored rows have loss 0.
    Layout of w / bias as in ops/cross_entropy.py."""
    x, w = x.contiguous(), w.contiguous()
    part = lse_partials(x, w, bias, target, dims, shared, label_smoothing, splits)
    run_max, run_sum, tgt_logit, logit_sum = part[..., :len(dims)].unbind(1)
    top = run_max.max(0).values
    lse = top + (run_sum * (run_max - top).exp()).sum(0).log()
    losses = lse - (1 - label_smoothing) * tgt_logit.sum(0)
    if label_smoothing:
        losses -= label_smoothing / w.shape[0] * logit_sum.sum(0)
    return torch.where((target != ignore_index)[:, None], losses, torch.zeros_like(losses)), lse
