"""Backward of the nested linear cross-entropy, for a tile of rows x classes.

With D_j = dL/dlogits_j = coef_j (softmax_j - onehot), feature segment s = [m_{s-1}, m_s) feeds every
logits_j with j >= s, so its gradient is G_s = sum_{j>=s} D_j: dx[:, seg] = G_s W[:, seg],
dW[:, seg] = G_s^T x[:, seg]. Shared head: recompute the full logits tile, then walk the segments from
last to first, adding D_s to G and subtracting the segment's partial product to step back to the
previous boundary's logits. Per-dim heads: one product per dim, no sharing. Tiles of different
programs meet in dx and dW, which are accumulated in fp32 with atomic adds.
"""
import torch
import triton
import triton.language as tl

from .aot import pointer
from .indexing import row_offsets
from .nested_ce_forward import LOG2E, head_logits, kernel_args, launch_config


@triton.jit
def softmax_grad(z, lse, coef, cls, ok, target, smoothing, n_classes):
    """coef * (softmax(z) - (1 - smoothing) onehot(target) - smoothing / C), zero outside `ok`."""
    p = tl.exp2((z - lse[:, None]) * LOG2E)
    d = p - tl.where(cls[None, :] == target[:, None], 1.0 - smoothing, 0.0) - smoothing / n_classes
    return tl.where(ok, d * coef[:, None], 0.0)


@triton.jit
def add_segment_grads(grad, x_rows, w_rows, dx_rows, dw_rows, row_ok, cls_ok, k_start, k_end, w_col0,
                      BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """dx[rows, k] += grad @ W[cls, w_col0 + k]; dW[cls, w_col0 + k] += grad^T @ x[rows, k] over the
    segment's columns k."""
    g = grad.to(x_rows.dtype.element_ty)
    for k in tl.range(k_start, k_end, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        xt = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        wt = tl.load(w_rows + (w_col0 + cols)[None, :], mask=cls_ok[:, None] & col_ok[None, :], other=0.0)
        tl.atomic_add(dx_rows + cols[None, :], tl.dot(g, wt, input_precision=PRECISION),
                      mask=row_ok[:, None] & col_ok[None, :])
        tl.atomic_add(dw_rows + (w_col0 + cols)[None, :], tl.dot(tl.trans(g), xt, input_precision=PRECISION),
                      mask=cls_ok[:, None] & col_ok[None, :])


@triton.jit
def nested_ce_backward_kernel(
    X, W, BIAS, TARGET, LSE, COEF, DX, DW, DB,
    n_rows, n_classes, stride_x, stride_w, stride_bias, smoothing,
    NEST: tl.constexpr, ORDER: tl.constexpr, OFFSETS: tl.constexpr,  # as in the forward kernel
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr,
    J_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cls = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    cls_ok = cls < n_classes
    ok = row_ok[:, None] & cls_ok[None, :]
    target = tl.load(TARGET + rows, mask=row_ok, other=-1)
    x_rows = X + row_offsets(rows, stride_x)[:, None]
    w_rows = W + row_offsets(cls, stride_w)[:, None]    # [BLOCK_N, 1]: W tiles as [classes, k]
    w_cols = W + row_offsets(cls, stride_w)[None, :]    # [1, BLOCK_N]: W tiles as [k, classes]
    dx_rows = DX + row_offsets(rows, stride_x)[:, None]  # dx and dW are contiguous fp32 copies of x and W
    dw_rows = DW + row_offsets(cls, stride_w)[:, None]
    stats = row_offsets(rows, len(NEST))                 # LSE and COEF are [n_rows, len(dims)]
    n_dims: tl.constexpr = len(NEST)
    if SHARED:
        acc = head_logits(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), x_rows, w_cols, row_ok, cls_ok, 0,
                          NEST[n_dims - 1], 0, BLOCK_K, PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + cls, mask=cls_ok, other=0.0).to(tl.float32)[None, :]
        grad = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for step in tl.static_range(n_dims):  # segments from last to first
            lse = tl.load(LSE + stats + ORDER[n_dims - 1 - step], mask=row_ok, other=0.0)
            coef = tl.load(COEF + stats + ORDER[n_dims - 1 - step], mask=row_ok, other=0.0)
            grad += softmax_grad(acc, lse, coef, cls, ok, target, smoothing, n_classes)
            seg_start = 0 if step == n_dims - 1 else NEST[n_dims - 2 - step]
            add_segment_grads(grad, x_rows, w_rows, dx_rows, dw_rows, row_ok, cls_ok, seg_start,
                              NEST[n_dims - 1 - step], 0, BLOCK_K, PRECISION)
            if step < n_dims - 1:  # step back to the previous boundary's logits
                acc = head_logits(acc, x_rows, w_cols, row_ok, cls_ok, seg_start, NEST[n_dims - 1 - step],
                                  0, BLOCK_K, PRECISION, SIGN=-1.0)
        if HAS_BIAS:
            tl.atomic_add(DB + cls, tl.sum(grad, axis=0), mask=cls_ok)
    else:
        for j in tl.static_range(n_dims):
            z = head_logits(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), x_rows, w_cols, row_ok, cls_ok, 0,
                            NEST[j], OFFSETS[ORDER[j]], BLOCK_K, PRECISION)
            if HAS_BIAS:
                z += tl.load(BIAS + ORDER[j] * stride_bias + cls, mask=cls_ok, other=0.0).to(tl.float32)[None, :]
            lse = tl.load(LSE + stats + ORDER[j], mask=row_ok, other=0.0)
            coef = tl.load(COEF + stats + ORDER[j], mask=row_ok, other=0.0)
            d = softmax_grad(z, lse, coef, cls, ok, target, smoothing, n_classes)
            add_segment_grads(d, x_rows, w_rows, dx_rows, dw_rows, row_ok, cls_ok, 0, NEST[j], OFFSETS[ORDER[j]],
                              BLOCK_K, PRECISION)
            if HAS_BIAS:
                tl.atomic_add(DB + ORDER[j] * stride_bias + cls, tl.sum(d, axis=0), mask=cls_ok)


def nested_ce_backward_triton(grad_losses, x, w, bias, target, lse, dims, shared, ignore_index, label_smoothing):
    """(dx, dw, db) for the per-row losses' upstream gradient [N, len(dims)]; db is empty without bias."""
    x, w = x.contiguous(), w.contiguous()
    n_rows, n_classes = x.shape[0], w.shape[0]
    cfg = launch_config(x.dtype)
    coef = (grad_losses.float() * (target != ignore_index)[:, None]).contiguous()
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=x.device)
    db = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if bias is not None else x.new_empty(0)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), triton.cdiv(n_classes, cfg["BLOCK_N"]))
    nested_ce_backward_kernel[grid](
        x, w, bias if bias is not None else w, target, lse.contiguous(), coef, dx, dw, db if bias is not None else dw,
        n_rows, n_classes, x.stride(0), w.stride(0), bias.stride(0) if bias is not None else 0, float(label_smoothing),
        SHARED=shared, HAS_BIAS=bias is not None, **kernel_args(dims, shared), **cfg)
    return dx.to(x.dtype), dw.to(w.dtype), db.to(bias.dtype) if bias is not None else db
