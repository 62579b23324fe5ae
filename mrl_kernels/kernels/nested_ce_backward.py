"""Backward of the nested linear cross-entropy, for a tile of rows x classes.

With D_j = dL/dlogits_j = coef_j (softmax_j - onehot), feature segment s = [m_{s-1}, m_s) feeds every
logits_j with j >= s, so its gradient is G_s = sum_{j>=s} D_j: dx[:, seg] = G_s W[:, seg],
dW[:, seg] = G_s^T x[:, seg]. Shared head: the program recomputes the logits tile (the forward's walk, see
its ChunkPlan), then walks the pieces from last to first (whole tiles, then the chunks below k_start):
where a piece ends at a nesting boundary it adds that dim's D_j to G, then adds the piece's dx and dW,
and subtracts the piece's product to step back to the previous boundary's logits. Per-dim heads: each
head's logits, its D_j, then its dx and dW. Tiles of different programs meet in dx and dW, which are
accumulated in fp32 with relaxed atomic adds (nothing reads them before the launch ends). The host launches
the classes in chunks so that only one chunk's fp32 dW accumulator exists at a time, and scales the
per-row coefficients by a power of two so that G, cast to the inputs' dtype for the gradient matmuls,
does not underflow fp16 (gradient_scale).
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .indexing import row_offsets
from .nested_ce_forward import (CHUNK_FIELDS, LOG2E, aot_launches, chunk_plan, chunk_product, head_logits, head_tiles,
                                launch_config)


@triton.jit
def softmax_grad(z, lse, coef, cls, ok, target, smoothing, total_classes):
    """coef * (softmax(z) - (1 - smoothing) onehot(target) - smoothing / C), zero outside `ok`; `cls` are
    class ids (not chunk-local), C = total_classes."""
    p = tl.exp2((z - lse[:, None]) * LOG2E)
    d = p - tl.where(cls[None, :] == target[:, None], 1.0 - smoothing, 0.0) - smoothing / total_classes
    return tl.where(ok, d * coef[:, None], 0.0)


@triton.jit
def add_dim_grad(grad, acc, dim, cls, cls_ok, class_offset, row_ok, target, LSE, COEF, stats, BIAS, DB, stride_bias,
                 smoothing, total_classes, SHARED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """grad + D_dim for the finished logits tile `acc` of dim `dim`; adds D_dim's column sums to dbias.
    `cls` index the launch's chunk of classes, which starts at class `class_offset`."""
    z = acc
    bias_row = (0 if SHARED else dim) * stride_bias
    if HAS_BIAS:
        z += tl.load(BIAS + bias_row + cls, mask=cls_ok, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(LSE + stats + dim, mask=row_ok, other=0.0)
    coef = tl.load(COEF + stats + dim, mask=row_ok, other=0.0)
    d = softmax_grad(z, lse, coef, class_offset + cls, row_ok[:, None] & cls_ok[None, :], target, smoothing,
                     total_classes)
    if HAS_BIAS:
        tl.atomic_add(DB + bias_row + cls, tl.sum(d, axis=0), mask=cls_ok, sem="relaxed")
    return grad + d


@triton.jit
def add_tile_grads(grad, xt, wt, dx_ptrs, dw_ptrs, dx_mask, dw_mask, PRECISION: tl.constexpr):
    """dx += grad @ W_tile, dW_tile += grad^T @ x_tile (fp32 atomics: other programs add to the same places)."""
    g = grad.to(xt.dtype)
    tl.atomic_add(dx_ptrs, tl.dot(g, wt, input_precision=PRECISION), mask=dx_mask, sem="relaxed")
    tl.atomic_add(dw_ptrs, tl.dot(tl.trans(g), xt, input_precision=PRECISION), mask=dw_mask, sem="relaxed")


@triton.jit
def bulk_add_tile_grads(grad, xt, wt, dx_desc, dw_desc, row0, cls0, k, PRECISION: tl.constexpr):
    """The same sums as add_tile_grads, each tile added by one tensor-descriptor reduction (on sm_90 one
    cp.reduce.async.bulk.tensor: no per-element atomics, no layout conversion); the descriptors clip the rows
    and classes past the end."""
    g = grad.to(xt.dtype)
    dx_desc.atomic_add([row0, k], tl.dot(g, wt, input_precision=PRECISION))
    dw_desc.atomic_add([cls0, k], tl.dot(tl.trans(g), xt, input_precision=PRECISION))


@triton.jit
def nested_ce_backward_kernel(
    X, W, BIAS, TARGET, LSE, COEF, DX, DW, DB, CHUNKS, FOLD_AT, HEADS, DX_DESC, DW_DESC,
    n_rows, n_classes, class_offset, total_classes, n_dims, n_chunks, k_start, k_end, stride_x, stride_w,
    stride_bias, smoothing, SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, K_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    BULK_REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cls = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    cls_ok = cls < n_classes
    kk = tl.arange(0, BLOCK_K)
    target = tl.load(TARGET + rows, mask=row_ok, other=-1)
    x_rows = X + row_offsets(rows, stride_x)[:, None]
    w_rows = W + row_offsets(cls, stride_w)[:, None]
    dx_rows = DX + row_offsets(rows, stride_x)[:, None]  # dx and dW are fp32 with x's and W's strides
    dw_rows = DW + row_offsets(cls, stride_w)[:, None]
    stats = row_offsets(rows, n_dims)                     # LSE and COEF are [n_rows, n_dims]
    grad = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if SHARED:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for chunk in range(n_chunks):
            acc, _, _, _, _, _ = chunk_product(acc, x_rows, w_rows, row_ok, cls_ok, CHUNKS, chunk, 1.0, K_ALIGN,
                                               BLOCK_K, PRECISION)
        for k in range(k_start, k_end, BLOCK_K):
            xt = tl.load(x_rows + (k + kk)[None, :], mask=row_ok[:, None], other=0.0)
            wt = tl.load(w_rows + (k + kk)[None, :], mask=cls_ok[:, None], other=0.0)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
        n_tiles = (k_end - k_start) // BLOCK_K
        for back in range(n_tiles):  # whole tiles, last to first
            k = k_end - (back + 1) * BLOCK_K
            dim = tl.load(FOLD_AT + n_tiles - 1 - back)
            if dim >= 0:  # acc holds logits_dim: add D_dim to the segment gradient
                grad = add_dim_grad(grad, acc, dim, cls, cls_ok, class_offset, row_ok, target, LSE, COEF, stats, BIAS,
                                    DB, stride_bias, smoothing, total_classes, SHARED, HAS_BIAS)
            xt = tl.load(x_rows + (k + kk)[None, :], mask=row_ok[:, None], other=0.0)
            wt = tl.load(w_rows + (k + kk)[None, :], mask=cls_ok[:, None], other=0.0)
            if BULK_REDUCE:  # whole tiles start at multiples of BLOCK_K: aligned as descriptors need
                bulk_add_tile_grads(grad, xt, wt, DX_DESC, DW_DESC, tl.program_id(0) * BLOCK_M,
                                    tl.program_id(1) * BLOCK_N, k, PRECISION)
            else:
                add_tile_grads(grad, xt, wt, dx_rows + (k + kk)[None, :], dw_rows + (k + kk)[None, :],
                               row_ok[:, None], cls_ok[:, None], PRECISION)
            acc -= tl.dot(xt, tl.trans(wt), input_precision=PRECISION)  # step back to the previous boundary
        for back in range(n_chunks):  # then the chunks below k_start, last to first
            chunk = n_chunks - 1 - back
            dim = tl.load(CHUNKS + chunk * CHUNK_FIELDS + 3)
            if dim >= 0:
                grad = add_dim_grad(grad, acc, dim, cls, cls_ok, class_offset, row_ok, target, LSE, COEF, stats, BIAS,
                                    DB, stride_bias, smoothing, total_classes, SHARED, HAS_BIAS)
            acc, xt, wt, cols, col_ok, w_shift = chunk_product(acc, x_rows, w_rows, row_ok, cls_ok, CHUNKS, chunk,
                                                               -1.0, K_ALIGN, BLOCK_K, PRECISION)
            add_tile_grads(grad, xt, wt, dx_rows + cols[None, :], dw_rows + (w_shift + cols)[None, :],
                           row_ok[:, None] & col_ok[None, :], cls_ok[:, None] & col_ok[None, :], PRECISION)
    else:
        for head in range(n_dims):
            acc, m, w0 = head_logits(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), x_rows, w_rows, row_ok, cls_ok, HEADS,
                                     head, K_ALIGN, BLOCK_K, PRECISION)
            d = add_dim_grad(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), acc, tl.load(HEADS + 3 * head + 2), cls,
                             cls_ok, class_offset, row_ok, target, LSE, COEF, stats, BIAS, DB, stride_bias, smoothing,
                             total_classes, SHARED, HAS_BIAS)
            for k in range(0, m, BLOCK_K):
                xt, wt, col_ok = head_tiles(x_rows, w_rows, row_ok, cls_ok, k, m, w0, kk)
                add_tile_grads(d, xt, wt, dx_rows + (k + kk)[None, :], dw_rows + (w0 + k + kk)[None, :],
                               row_ok[:, None] & col_ok[None, :], cls_ok[:, None] & col_ok[None, :], PRECISION)


# Whole-tile gradients by tensor-descriptor bulk reductions (bulk_add_tile_grads) instead of per-element relaxed
# atomics: off until a GPU run measures it (bench/nested_ce_gpu.py); the tests run it under the interpreter.
# Needs a shared head, 16-bit inputs (the AOT-checked variants), fp32 rows of whole 16 bytes (D % 4 == 0) and,
# on a GPU, sm_90 or later (TMA).
BULK_REDUCE = False


def use_bulk_reduce(x: torch.Tensor, shared: bool) -> bool:
    if not (BULK_REDUCE and shared and x.dtype != torch.float32 and x.shape[1] % 4 == 0):
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] >= 9


# fp32 bytes of the dW accumulator: classes are launched in chunks of about this much (whole class tiles), each
# chunk's accumulator cast into dW as it finishes, so a vocab-sized head never holds a whole fp32 copy of dW
# (C=128,256 x D=2048 would be 1 GB next to the 0.5 GB bf16 result).
DW_CHUNK_BYTES = 64 << 20


def class_chunk(n_classes: int, width: int, block_n: int) -> int:
    """Classes per launch: whole BLOCK_N tiles within DW_CHUNK_BYTES of fp32 dW rows (at least one tile)."""
    per_tile = block_n * width * 4
    return min(n_classes, max(1, DW_CHUNK_BYTES // per_tile) * block_n)


def nested_ce_backward_triton(grad_losses, x, w, bias, target, lse, dims, shared, ignore_index, label_smoothing):
    """(dx, dw, db) for the per-row losses' upstream gradient [N, len(dims)]; db is empty without bias.
    dx and db accumulate in fp32 over every class chunk; dw in fp32 one chunk at a time (DW_CHUNK_BYTES)."""
    x, w = x.contiguous(), w.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n_rows, n_classes = x.shape[0], w.shape[0]
    cfg = launch_config(x.dtype, backward=True)
    plan = chunk_plan(dims, shared, cfg["BLOCK_K"], x.device)
    coef = grad_losses.float() * (target != ignore_index)[:, None]
    scale = gradient_scale(coef)
    coef = (coef * scale).contiguous()
    unscale = scale.reciprocal()  # exact: a power of two
    lse = lse.contiguous()
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dw = torch.empty_like(w)
    db = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if bias is not None else x.new_empty(0)
    chunk = class_chunk(n_classes, w.shape[1], cfg["BLOCK_N"])
    dw_acc = torch.empty((chunk, w.shape[1]), dtype=torch.float32, device=x.device)
    bulk = use_bulk_reduce(x, shared)
    dx_desc = TensorDescriptor.from_tensor(dx, [cfg["BLOCK_M"], cfg["BLOCK_K"]]) if bulk else None
    for c0 in range(0, n_classes, chunk):
        c1 = min(n_classes, c0 + chunk)
        acc = dw_acc[:c1 - c0].zero_()
        w_c = w[c0:c1]
        grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), triton.cdiv(c1 - c0, cfg["BLOCK_N"]))
        nested_ce_backward_kernel[grid](
            x, w_c, bias[:, c0:c1] if bias is not None else w_c, target, lse, coef, dx, acc,
            db[:, c0:c1] if bias is not None else acc, plan.chunks, plan.fold_at, plan.heads, dx_desc,
            TensorDescriptor.from_tensor(acc, [cfg["BLOCK_N"], cfg["BLOCK_K"]]) if bulk else None, n_rows, c1 - c0, c0,
            n_classes, len(dims), plan.chunks.shape[0], plan.k_start, plan.k_end, x.stride(0), w.stride(0),
            bias.stride(0) if bias is not None else 0, float(label_smoothing),
            SHARED=shared, HAS_BIAS=bias is not None, K_ALIGN=plan.k_align, BULK_REDUCE=bulk, **cfg)
        dw[c0:c1] = acc.mul_(unscale)
    db = db.mul_(unscale).to(bias.dtype) if bias is not None else db
    return dx.mul_(unscale).to(x.dtype), dw, db


def gradient_scale(coef: torch.Tensor) -> torch.Tensor:
    """A power of two (a 0-d fp32 tensor, no host sync) that brings max_r sum_j |coef[r, j]| into [1, 2).
    The kernel casts the segment gradient G = sum_j coef_j (softmax_j - onehot) to x's dtype for the gradient
    matmuls; |G| is at most that row sum, and with coef ~ 1/N and softmax ~ 1/C its entries fall below fp16's
    smallest subnormal (6e-8) once N * C passes ~1.7e7 (fp16, N=2048, C=16,384: dx 8.5% off). Scaled, G
    spans fp16's range below 2 instead; the fp32 accumulators are unscaled exactly. All-zero or non-finite
    coefficients keep scale 1 (NaN and inf propagate as they are)."""
    bound = coef.abs().sum(dim=1).amax() if coef.numel() else coef.new_zeros(())
    exponent = torch.frexp(bound).exponent  # bound = mantissa * 2**exponent, mantissa in [0.5, 1)
    scale = torch.ldexp(torch.ones_like(bound), (1 - exponent).clamp(-126, 126))
    return torch.where((bound > 0) & torch.isfinite(bound), scale, torch.ones_like(bound))


def aot_specs():
    """The shipped launches (per-element relaxed atomics), each followed, for 16-bit shared heads, by its
    bulk-reduction variant (BULK_REDUCE), compiled for sm_90 only: that is where use_bulk_reduce launches it
    (on sm_80 Triton emulates the descriptor reduction with acq_rel atomics)."""
    from .aot import pointer  # the compiler module: imported by the AOT check only, not by a launch

    for label, dtype, constexprs, options in aot_launches(backward=True):
        variants = [(label, dict(constexprs, BULK_REDUCE=False, DX_DESC=None, DW_DESC=None), options)]
        if dtype != torch.float32 and constexprs["SHARED"]:  # use_bulk_reduce: sm_90+ (sm_80 emulates TMA)
            variants.append((f"{label}-bulk", dict(constexprs, BULK_REDUCE=True), dict(options, min_arch=90)))
        for name, consts, opts in variants:
            m, n, k = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"]
            descriptors = ({"DX_DESC": f"tensordesc<fp32[{m}, {k}]>", "DW_DESC": f"tensordesc<fp32[{n}, {k}]>"}
                           if consts["BULK_REDUCE"] else {"DX_DESC": "constexpr", "DW_DESC": "constexpr"})
            signature = {"X": pointer(dtype), "W": pointer(dtype), "BIAS": pointer(dtype), "TARGET": "*i64",
                         "LSE": "*fp32", "COEF": "*fp32", "DX": "*fp32", "DW": "*fp32", "DB": "*fp32",
                         "CHUNKS": "*i32", "FOLD_AT": "*i32", "HEADS": "*i32", **descriptors, "n_rows": "i32",
                         "n_classes": "i32", "class_offset": "i32", "total_classes": "i32", "n_dims": "i32",
                         "n_chunks": "i32", "k_start": "i32", "k_end": "i32", "stride_x": "i32", "stride_w": "i32",
                         "stride_bias": "i32", "smoothing": "fp32"}
            signature.update({c: "constexpr" for c in consts if c not in signature})
            yield name, nested_ce_backward_kernel, signature, consts, opts
