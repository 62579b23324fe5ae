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

This module holds the pointer-load kernel (sm_80, fp32, per-dim heads, rows not whole 16 bytes) and the
launcher; a 16-bit shared head on sm_90 runs the same walk by TMA with bulk tile reductions
(nested_ce_backward_tma). The one-hot and label-smoothing terms stay inside both kernels: a compare and a
subtraction on the fp32 tile before its cast, where outside they would cost an extra O(N * D) pass over x
and W[target] and an N x D fp32 buffer per class chunk.
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .indexing import row_offsets
from .launch import split_launch_options
from .nested_ce_backward_tma import head_pieces, nested_ce_backward_tma_kernel, softmax_grad
from .nested_ce_forward import (BIAS_FIELDS, CHUNK_FIELDS, TMA_BOX, aot_launches, bias_columns, chunk_plan,
                                chunk_product, head_logits, head_tiles, launch_config, use_tma)


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
def nested_ce_backward_kernel(
    X, W, BIAS, TARGET, LSE, COEF, DX, DW, DB, CHUNKS, FOLD_AT, HEADS,
    n_rows, n_classes, class_offset, total_classes, n_dims, n_chunks, k_start, k_end, stride_x, stride_w,
    stride_bias, smoothing, SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, K_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
            add_tile_grads(grad, xt, wt, dx_rows + (k + kk)[None, :], dw_rows + (k + kk)[None, :], row_ok[:, None],
                           cls_ok[:, None], PRECISION)
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
    dx and db accumulate in fp32 over every class chunk; dw in fp32 one chunk at a time (DW_CHUNK_BYTES).
    A shared head with 16-bit rows of whole 16 bytes runs the TMA kernel on sm_90 (and in the interpreter),
    everything else the pointer kernel."""
    x, w = x.contiguous(), w.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n_rows, n_classes = x.shape[0], w.shape[0]
    tma = shared and use_tma(x, w) and descriptor_reductions(x.device)
    cfg = launch_config(x.dtype, backward=True, tma=tma)
    plan = chunk_plan(dims, shared, cfg["BLOCK_K"], x.device)
    coef = grad_losses.float() * (target != ignore_index)[:, None]
    scale = gradient_scale(coef)
    coef = (coef * scale).contiguous()
    unscale = scale.reciprocal()  # exact: a power of two
    lse = lse.contiguous()
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dw = torch.empty_like(w)
    chunk = class_chunk(n_classes, w.shape[1], cfg["BLOCK_N"])
    dw_acc = torch.empty((chunk, w.shape[1]), dtype=torch.float32, device=x.device)
    launch = _launch_tma if tma else _launch_pointer
    db = launch(x, w, bias, target, lse, coef, dx, dw, dw_acc, unscale, dims, shared, plan, cfg, chunk,
                float(label_smoothing))
    return dx.mul_(unscale).to(x.dtype), dw, db


# Row tiles that sweep the class tiles together in the TMA backward (grouped_tile).
GROUP_M = 8


def descriptor_reductions(device: torch.device) -> bool:
    """Whether tensor-descriptor reductions run there: on a GPU that use_tma accepts (sm_90), yes; in the CPU
    interpreter only where it has them (Triton 3.6's has none; the tests add one, see the root conftest.py)."""
    if device.type != "cpu":
        return True
    from triton.runtime import interpreter

    return hasattr(interpreter.InterpreterBuilder, "create_descriptor_reduce")


def _class_chunks(n_classes: int, chunk: int, dw, dw_acc, unscale):
    """Yields (c0, c1, the chunk's zeroed fp32 dW accumulator); casts each accumulator into dW after its launch."""
    for c0 in range(0, n_classes, chunk):
        c1 = min(n_classes, c0 + chunk)
        acc = dw_acc[:c1 - c0].zero_()
        yield c0, c1, acc
        dw[c0:c1] = acc.mul_(unscale)


def _launch_pointer(x, w, bias, target, lse, coef, dx, dw, dw_acc, unscale, dims, shared, plan, cfg, chunk,
                    smoothing):
    """The pointer kernel over the class chunks; returns db."""
    n_rows, n_classes = x.shape[0], w.shape[0]
    db = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if bias is not None else x.new_empty(0)
    for c0, c1, acc in _class_chunks(n_classes, chunk, dw, dw_acc, unscale):
        w_c = w[c0:c1]
        grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), triton.cdiv(c1 - c0, cfg["BLOCK_N"]))
        nested_ce_backward_kernel[grid](
            x, w_c, bias[:, c0:c1] if bias is not None else w_c, target, lse, coef, dx, acc,
            db[:, c0:c1] if bias is not None else acc, plan.chunks, plan.fold_at, plan.heads, n_rows, c1 - c0, c0,
            n_classes, len(dims), plan.chunks.shape[0], plan.k_start, plan.k_end, x.stride(0), w.stride(0),
            bias.stride(0) if bias is not None else 0, smoothing, SHARED=shared, HAS_BIAS=bias is not None,
            K_ALIGN=plan.k_align, **cfg)
    return db.mul_(unscale).to(bias.dtype) if bias is not None else db


def _launch_tma(x, w, bias, target, lse, coef, dx, dw, dw_acc, unscale, dims, shared, plan, cfg, chunk, smoothing):
    """The TMA kernel (shared head) over the class chunks; returns db. The bias gradient accumulates in an fp32
    row padded to whole 16 bytes (TMA's stride rule)."""
    n_rows, n_classes = x.shape[0], w.shape[0]
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    desc = TensorDescriptor.from_tensor
    pieces = head_pieces(dims, plan.k_start, TMA_BOX).to(x.device)
    db = torch.zeros((1, -(-n_classes // 4) * 4), dtype=torch.float32, device=x.device)
    dx_descs = desc(dx, [block_m, block_k]), desc(dx, [block_m, TMA_BOX])
    x_descs = desc(x, [block_m, block_k]), desc(x, [block_m, TMA_BOX])
    for c0, c1, acc in _class_chunks(n_classes, chunk, dw, dw_acc, unscale):
        w_c = w[c0:c1]
        bias_cols = bias_columns(bias[:, c0:c1] if bias is not None else None, 1, c1 - c0, block_n, x.dtype,
                                 x.device)
        grid = (triton.cdiv(n_rows, block_m) * triton.cdiv(c1 - c0, block_n),)
        nested_ce_backward_tma_kernel[grid](
            bias_cols, target, lse, coef, plan.fold_at, pieces, x_descs[0], desc(w_c, [block_n, block_k]),
            x_descs[1], desc(w_c, [block_n, TMA_BOX]), desc(bias_cols, [block_n, BIAS_FIELDS.value]), dx_descs[0],
            desc(acc, [block_n, block_k]), dx_descs[1], desc(acc, [block_n, TMA_BOX]),
            desc(db[:, c0:], [1, block_n]), n_rows, c1 - c0, c0, n_classes, len(dims), pieces.shape[0],
            plan.k_start, plan.k_end, smoothing, BOX=TMA_BOX, GROUP_M=GROUP_M, **cfg)
    return db[0, :n_classes].mul_(unscale).to(bias.dtype)[None] if bias is not None else x.new_empty(0)


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
    """The shipped launches of the pointer kernel (per-element relaxed atomics), each followed, for 16-bit shared
    heads, by the TMA kernel's, compiled for sm_90 only: that is where use_tma launches it (on sm_80 Triton
    emulates descriptor reductions with acq_rel atomics)."""
    from .aot import pointer  # the compiler module: imported by the AOT check only, not by a launch

    for label, dtype, constexprs, options in aot_launches(backward=True):
        signature = {"X": pointer(dtype), "W": pointer(dtype), "BIAS": pointer(dtype), "TARGET": "*i64",
                     "LSE": "*fp32", "COEF": "*fp32", "DX": "*fp32", "DW": "*fp32", "DB": "*fp32", "CHUNKS": "*i32",
                     "FOLD_AT": "*i32", "HEADS": "*i32", "n_rows": "i32", "n_classes": "i32", "class_offset": "i32",
                     "total_classes": "i32", "n_dims": "i32", "n_chunks": "i32", "k_start": "i32", "k_end": "i32",
                     "stride_x": "i32", "stride_w": "i32", "stride_bias": "i32", "smoothing": "fp32"}
        signature.update({c: "constexpr" for c in constexprs})
        yield label, nested_ce_backward_kernel, signature, constexprs, options
        if dtype != torch.float32 and constexprs["SHARED"]:
            consts, opts = split_launch_options(launch_config(dtype, backward=True, tma=True))
            consts.update(BOX=TMA_BOX, GROUP_M=GROUP_M)
            m, n, k, elem = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"], pointer(dtype)[1:]
            boxes = {"X_DESC": (elem, m, k), "W_DESC": (elem, n, k), "X_BOX_DESC": (elem, m, TMA_BOX),
                     "W_BOX_DESC": (elem, n, TMA_BOX), "BIAS_DESC": (elem, n, BIAS_FIELDS.value),
                     "DX_DESC": ("fp32", m, k), "DW_DESC": ("fp32", n, k), "DX_BOX_DESC": ("fp32", m, TMA_BOX),
                     "DW_BOX_DESC": ("fp32", n, TMA_BOX), "DB_DESC": ("fp32", 1, n)}
            signature = {"BIAS_COLS": pointer(dtype), "TARGET": "*i64", "LSE": "*fp32", "COEF": "*fp32",
                         "FOLD_AT": "*i32", "PIECES": "*i32",
                         **{name: f"tensordesc<{ty}[{rows}, {cols}]>" for name, (ty, rows, cols) in boxes.items()},
                         "n_rows": "i32", "n_classes": "i32", "class_offset": "i32", "total_classes": "i32",
                         "n_dims": "i32", "n_pieces": "i32", "k_start": "i32", "k_end": "i32", "smoothing": "fp32"}
            signature.update({c: "constexpr" for c in consts})
            yield f"{label}-tma", nested_ce_backward_tma_kernel, signature, consts, dict(opts, min_arch=90)
