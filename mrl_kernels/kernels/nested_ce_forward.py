"""Forward of the nested linear cross-entropy: every dim's log-sum-exp in one walk over the features.

A program owns BLOCK_M rows and one split of the classes. For each class tile it walks the feature
dim once. Shared head: the columns are cut at every nesting boundary, so the running accumulator equals
logits_j exactly where a piece ends at m_j, and is folded there into dim j's online log-sum-exp. The
pieces come from a `ChunkPlan`: below `k_start` a small table of chunks (at most BLOCK_K columns, cut at
the boundaries there, e.g. 8, 16, 32 of the paper's dims); from `k_start` on, whole BLOCK_K tiles,
since every boundary there falls on a tile end. Tile addresses depend on the loop counter alone, so
the compiler can software-pipeline that loop, where almost all the work is. Per-dim heads: one masked
K loop per head. No logits reach memory. The fold state (max, sum of exps, target logit, logit sum per
row and dim) lives in the split's slice of the output, and splits are combined afterwards in a fixed
order: deterministic, no locks.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._nesting import nesting
from .indexing import row_offsets

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)); exp2 is the fast hardware unit
# Columns of the chunk table: first column, end column, first weight column, and the caller's index of
# the dim whose logits are complete at the chunk's end (-1 where none is).
CHUNK_FIELDS = tl.constexpr(4)


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
def head_tiles(x_rows, w_rows, row_ok, cls_ok, k, m, w0, kk):
    """x[rows, k:k+BLOCK_K] and W[cls, w0 + (k:k+BLOCK_K)] of a per-dim head of m columns, masked at m."""
    col_ok = k + kk < m
    xt = tl.load(x_rows + (k + kk)[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    wt = tl.load(w_rows + (w0 + k + kk)[None, :], mask=cls_ok[:, None] & col_ok[None, :], other=0.0)
    return xt, wt, col_ok


@triton.jit
def head_logits(x_rows, w_rows, row_ok, cls_ok, HEADS, head, K_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(logits tile, m, w0) of per-dim head `head` (HEADS rows: m, first weight column, caller's index)."""
    m = tl.load(HEADS + 3 * head)
    w0 = tl.multiple_of(tl.load(HEADS + 3 * head + 1), K_ALIGN)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, m, BLOCK_K):
        xt, wt, _ = head_tiles(x_rows, w_rows, row_ok, cls_ok, k, m, w0, kk)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    return acc, m, w0


@triton.jit
def fold_into_lse(acc, dim, state, stride_part, cls, cls_ok, row_ok, target, BIAS, stride_bias,
                  SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTHING: tl.constexpr):
    """Fold a finished logits tile of dim `dim` into its rows' online log-sum-exp state."""
    z = acc
    if HAS_BIAS:
        bias = BIAS + (0 if SHARED else dim) * stride_bias + cls
        z += tl.load(bias, mask=cls_ok, other=0.0).to(tl.float32)[None, :]
    z = tl.where(cls_ok[None, :], z, float("-inf"))
    old_max = tl.load(state + dim, mask=row_ok, other=0.0)
    new_max = tl.maximum(old_max, tl.max(z, axis=1))
    tile_sum = tl.sum(tl.exp2((z - new_max[:, None]) * LOG2E), axis=1)
    old_sum = tl.load(state + stride_part + dim, mask=row_ok, other=0.0)
    tl.store(state + dim, new_max, mask=row_ok)
    tl.store(state + stride_part + dim, old_sum * tl.exp2((old_max - new_max) * LOG2E) + tile_sum, mask=row_ok)
    hit = (cls[None, :] == target[:, None]) & cls_ok[None, :]
    tgt = tl.load(state + 2 * stride_part + dim, mask=row_ok, other=0.0)
    tl.store(state + 2 * stride_part + dim, tgt + tl.sum(tl.where(hit, z, 0.0), axis=1), mask=row_ok)
    if SMOOTHING:
        total = tl.load(state + 3 * stride_part + dim, mask=row_ok, other=0.0)
        tl.store(state + 3 * stride_part + dim, total + tl.sum(tl.where(cls_ok[None, :], z, 0.0), axis=1),
                 mask=row_ok)


@triton.jit
def nested_lse_forward_kernel(
    X, W, BIAS, TARGET, PART, CHUNKS, FOLD_AT, HEADS,
    n_rows, n_classes, n_dims, n_chunks, k_start, k_end, classes_per_split,
    stride_x, stride_w, stride_bias, stride_part,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, SMOOTHING: tl.constexpr,
    K_ALIGN: tl.constexpr,    # every chunk start is a multiple of this: lets loads be vectorized
    PRECISION: tl.constexpr,  # tl.dot precision: "ieee" keeps fp32 inputs exact, else tensor cores
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    x_rows = X + row_offsets(rows, stride_x)[:, None]
    target = tl.load(TARGET + rows, mask=row_ok, other=-1)
    kk = tl.arange(0, BLOCK_K)
    # PART is [splits, 4, n_rows, n_dims]: this program's rows of its split, per dim (initialised by the host).
    state = PART + tl.program_id(1).to(tl.int64) * 4 * stride_part + row_offsets(rows, n_dims)
    # A loop bound taken from program_id breaks the interpreter, so every split walks classes_per_split
    # (whole tiles) and the tail of the last split is masked.
    c_begin = tl.program_id(1) * classes_per_split
    for c0 in range(0, classes_per_split, BLOCK_N):
        cls = c_begin + c0 + tl.arange(0, BLOCK_N)
        cls_ok = cls < n_classes
        w_rows = W + row_offsets(cls, stride_w)[:, None]
        if SHARED:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for chunk in range(n_chunks):  # below k_start: chunks cut at every boundary
                acc, _, _, _, _, _ = chunk_product(acc, x_rows, w_rows, row_ok, cls_ok, CHUNKS, chunk, 1.0, K_ALIGN,
                                                   BLOCK_K, PRECISION)
                dim = tl.load(CHUNKS + chunk * CHUNK_FIELDS + 3)
                if dim >= 0:
                    fold_into_lse(acc, dim, state, stride_part, cls, cls_ok, row_ok, target, BIAS, stride_bias,
                                  SHARED, HAS_BIAS, SMOOTHING)
            for k in range(k_start, k_end, BLOCK_K):  # whole tiles: boundaries only at tile ends
                xt = tl.load(x_rows + (k + kk)[None, :], mask=row_ok[:, None], other=0.0)
                wt = tl.load(w_rows + (k + kk)[None, :], mask=cls_ok[:, None], other=0.0)
                acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
                dim = tl.load(FOLD_AT + (k - k_start) // BLOCK_K)
                if dim >= 0:
                    fold_into_lse(acc, dim, state, stride_part, cls, cls_ok, row_ok, target, BIAS, stride_bias,
                                  SHARED, HAS_BIAS, SMOOTHING)
        else:
            for head in range(n_dims):
                acc, _, _ = head_logits(x_rows, w_rows, row_ok, cls_ok, HEADS, head, K_ALIGN, BLOCK_M, BLOCK_N,
                                        BLOCK_K, PRECISION)
                fold_into_lse(acc, tl.load(HEADS + 3 * head + 2), state, stride_part, cls, cls_ok, row_ok, target,
                              BIAS, stride_bias, SHARED, HAS_BIAS, SMOOTHING)


@dataclass
class ChunkPlan:
    """How the kernels walk the feature columns (see the module docstring).
    chunks: int32 [n, 4] (first column, end column, first weight column, dim folded at the end or -1), the
    shared head's columns below k_start; fold_at: int32, per whole tile from k_start to k_end, the dim folded
    at its end or -1; heads: int32 [len(dims), 3] (m, first weight column, caller's index) ascending, the
    per-dim heads (concatenated along columns in the caller's order); k_align: what every chunk start is a
    multiple of."""
    chunks: torch.Tensor
    fold_at: torch.Tensor
    heads: torch.Tensor
    k_start: int
    k_end: int
    k_align: int


def chunk_plan(dims, shared: bool, block_k: int, device) -> ChunkPlan:
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
    k_align = 16  # chunk starts and per-dim head offsets are all multiples of this
    while any(v % k_align for v in [c[0] for c in chunks] + [c[2] for c in chunks] + [h[1] for h in heads]):
        k_align //= 2
    as_tensor = lambda rows, width: torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, width)  # noqa: E731
    return ChunkPlan(as_tensor(chunks, CHUNK_FIELDS.value), as_tensor(fold_at, 1)[:, 0], as_tensor(heads, 3),
                     k_start, k_end, k_align)


def launch_config(dtype: torch.dtype, backward: bool = False) -> dict:
    """Tiles for a launch; the AOT compile test compiles exactly these (see its register and spill report).
    16-bit: K tiles of 64, three pipeline stages; forward tiles of 64 rows x 128 classes, backward tiles of
    128 x 64 (it holds the logits and the gradient tile at once). fp32 runs the exact (non tensor-core)
    dot, whose operands need more registers: 64 x 64 x 32 tiles, no pipelining."""
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 1, "PRECISION": "ieee"}
    block_m, block_n = (128, 64) if backward else (64, 128)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
            "PRECISION": "tf32"}


def class_splits(n_rows: int, n_classes: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Enough class splits for about two programs per multiprocessor; never an empty split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, triton.cdiv(n_rows, block_m)), triton.cdiv(n_classes, block_n)))


def lse_partials(x, w, bias, target, dims, shared, label_smoothing, splits=None):
    """Runs the kernel: [splits, 4, N, len(dims)] fp32 partials (max, sum of exps, target logit, logit
    sum) per class split, row and dim (caller's order). `splits` overrides the number of class splits."""
    n_rows, n_classes = x.shape[0], w.shape[0]
    cfg = launch_config(x.dtype)
    plan = chunk_plan(dims, shared, cfg["BLOCK_K"], x.device)
    splits = splits or class_splits(n_rows, n_classes, cfg["BLOCK_M"], cfg["BLOCK_N"], x.device)
    # Whole class tiles per split, so every split but the last is full and none is empty.
    per_split = triton.cdiv(triton.cdiv(n_classes, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    splits = triton.cdiv(n_classes, per_split)
    part = torch.zeros((splits, 4, n_rows, len(dims)), dtype=torch.float32, device=x.device)
    part[:, 0] = float("-inf")  # running maxima start empty
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), splits)
    nested_lse_forward_kernel[grid](
        x, w, bias if bias is not None else w, target, part, plan.chunks, plan.fold_at, plan.heads,
        n_rows, n_classes, len(dims), plan.chunks.shape[0], plan.k_start, plan.k_end, per_split,
        x.stride(0), w.stride(0), bias.stride(0) if bias is not None else 0, n_rows * len(dims),
        SHARED=shared, HAS_BIAS=bias is not None, SMOOTHING=label_smoothing > 0, K_ALIGN=plan.k_align, **cfg)
    return part


def nested_ce_forward_triton(x, w, bias, target, dims, shared, ignore_index, label_smoothing, splits=None):
    """(per-row losses, LSEs), [N, len(dims)] fp32, columns in the caller's order; ignored rows have loss 0.
    Layout of w / bias as in ops/nested_ce.py."""
    x, w = x.contiguous(), w.contiguous()
    run_max, run_sum, tgt_logit, logit_sum = lse_partials(x, w, bias, target, dims, shared, label_smoothing,
                                                          splits).unbind(1)
    top = run_max.max(0).values
    lse = top + (run_sum * (run_max - top).exp()).sum(0).log()
    losses = lse - (1 - label_smoothing) * tgt_logit.sum(0)
    if label_smoothing:
        losses -= label_smoothing / w.shape[0] * logit_sum.sum(0)
    return torch.where((target != ignore_index)[:, None], losses, torch.zeros_like(losses)), lse


# The launches compiled ahead of time: every dtype and head kind at the paper's dims, odd dims in bf16.
AOT_DIMS = {"paper": (8, 16, 32, 64, 128, 256, 512, 1024, 2048), "odd": (17, 3, 70)}


def aot_launches(backward: bool = False):
    """(label, dtype, constexprs, options) for the AOT check."""
    from .aot import split_launch_options  # the compiler module: imported by the AOT check only, not by a launch

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
    from .aot import pointer

    for label, dtype, constexprs, options in aot_launches():
        constexprs = dict(constexprs, SMOOTHING=True)
        signature = {"X": pointer(dtype), "W": pointer(dtype), "BIAS": pointer(dtype), "TARGET": "*i64",
                     "PART": "*fp32", "CHUNKS": "*i32", "FOLD_AT": "*i32", "HEADS": "*i32", "n_rows": "i32",
                     "n_classes": "i32", "n_dims": "i32", "n_chunks": "i32", "k_start": "i32", "k_end": "i32",
                     "classes_per_split": "i32", "stride_x": "i32", "stride_w": "i32", "stride_bias": "i32",
                     "stride_part": "i32"}
        signature.update({name: "constexpr" for name in constexprs})
        yield label, nested_lse_forward_kernel, signature, constexprs, options
