"""Backward of the nested linear cross-entropy, for a tile of rows x classes.

With D_j = dL/dlogits_j = coef_j (softmax_j - onehot), feature segment s = [m_{s-1}, m_s) feeds every
logits_j with j >= s, so its gradient is G_s = sum_{j>=s} D_j: dx[:, seg] = G_s W[:, seg],
dW[:, seg] = G_s^T x[:, seg]. For each group of chunks sharing an accumulator (see chunk_table), the
program recomputes the logits tile over the group, then walks its chunks from last to first: where a
chunk ends at a nesting boundary it adds that dim's D_j to G, then adds the chunk's dx and dW, and (shared
head) subtracts the chunk's product to step back to the previous boundary's logits. Tiles of different
programs meet in dx and dW, which are accumulated in fp32 with atomic adds.
"""
import torch
import triton
import triton.language as tl

from .aot import pointer
from .indexing import row_offsets
from .nested_ce_forward import CHUNK_FIELDS, LOG2E, aot_launches, chunk_product, chunk_table, launch_config


@triton.jit
def softmax_grad(z, lse, coef, cls, ok, target, smoothing, n_classes):
    """coef * (softmax(z) - (1 - smoothing) onehot(target) - smoothing / C), zero outside `ok`."""
    p = tl.exp2((z - lse[:, None]) * LOG2E)
    d = p - tl.where(cls[None, :] == target[:, None], 1.0 - smoothing, 0.0) - smoothing / n_classes
    return tl.where(ok, d * coef[:, None], 0.0)


@triton.jit
def nested_ce_backward_kernel(
    X, W, BIAS, TARGET, LSE, COEF, DX, DW, DB, CHUNKS, GROUPS,
    n_rows, n_classes, n_dims, n_groups, stride_x, stride_w, stride_bias, smoothing,
    SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, K_ALIGN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cls = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    cls_ok = cls < n_classes
    ok = row_ok[:, None] & cls_ok[None, :]
    target = tl.load(TARGET + rows, mask=row_ok, other=-1)
    x_rows = X + row_offsets(rows, stride_x)[:, None]
    w_rows = W + row_offsets(cls, stride_w)[:, None]
    dx_rows = DX + row_offsets(rows, stride_x)[:, None]  # dx and dW are fp32 with x's and W's strides
    dw_rows = DW + row_offsets(cls, stride_w)[:, None]
    stats = row_offsets(rows, n_dims)                     # LSE and COEF are [n_rows, n_dims]
    for group in range(n_groups):
        first = tl.load(GROUPS + group)
        end = tl.load(GROUPS + group + 1)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for chunk in range(first, end):
            acc, _, _, _, _, _ = chunk_product(acc, x_rows, w_rows, row_ok, cls_ok, CHUNKS, chunk, 1.0, K_ALIGN,
                                               BLOCK_K, PRECISION)
        grad = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for back in range(end - first):
            chunk = end - 1 - back
            dim = tl.load(CHUNKS + chunk * CHUNK_FIELDS + 3)
            if dim >= 0:  # acc holds logits_dim: add D_dim to the segment gradient
                z = acc
                bias_row = (0 if SHARED else dim) * stride_bias
                if HAS_BIAS:
                    z += tl.load(BIAS + bias_row + cls, mask=cls_ok, other=0.0).to(tl.float32)[None, :]
                lse = tl.load(LSE + stats + dim, mask=row_ok, other=0.0)
                coef = tl.load(COEF + stats + dim, mask=row_ok, other=0.0)
                d = softmax_grad(z, lse, coef, cls, ok, target, smoothing, n_classes)
                grad += d
                if HAS_BIAS:
                    tl.atomic_add(DB + bias_row + cls, tl.sum(d, axis=0), mask=cls_ok)
            # The chunk's product leaves acc (shared head: step back a chunk) and gives its x and W tiles.
            acc, xt, wt, cols, col_ok, w_shift = chunk_product(acc, x_rows, w_rows, row_ok, cls_ok, CHUNKS, chunk,
                                                               -1.0, K_ALIGN, BLOCK_K, PRECISION)
            g = grad.to(xt.dtype)
            tl.atomic_add(dx_rows + cols[None, :], tl.dot(g, wt, input_precision=PRECISION),
                          mask=row_ok[:, None] & col_ok[None, :])
            tl.atomic_add(dw_rows + (w_shift + cols)[None, :], tl.dot(tl.trans(g), xt, input_precision=PRECISION),
                          mask=cls_ok[:, None] & col_ok[None, :])


def nested_ce_backward_triton(grad_losses, x, w, bias, target, lse, dims, shared, ignore_index, label_smoothing):
    """(dx, dw, db) for the per-row losses' upstream gradient [N, len(dims)]; db is empty without bias."""
    x, w = x.contiguous(), w.contiguous()
    n_rows, n_classes = x.shape[0], w.shape[0]
    cfg = launch_config(x.dtype, backward=True)
    chunks, groups, k_align = chunk_table(dims, shared, cfg["BLOCK_K"], x.device)
    groups = torch.tensor(groups, dtype=torch.int32, device=x.device)
    coef = (grad_losses.float() * (target != ignore_index)[:, None]).contiguous()
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=x.device)
    db = torch.zeros(bias.shape, dtype=torch.float32, device=x.device) if bias is not None else x.new_empty(0)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), triton.cdiv(n_classes, cfg["BLOCK_N"]))
    nested_ce_backward_kernel[grid](
        x, w, bias if bias is not None else w, target, lse.contiguous(), coef, dx, dw, db if bias is not None else dw,
        chunks, groups, n_rows, n_classes, len(dims), groups.numel() - 1, x.stride(0), w.stride(0),
        bias.stride(0) if bias is not None else 0, float(label_smoothing),
        SHARED=shared, HAS_BIAS=bias is not None, K_ALIGN=k_align, **cfg)
    return dx.to(x.dtype), dw.to(w.dtype), db.to(bias.dtype) if bias is not None else db


def aot_specs():
    for label, dtype, constexprs, options in aot_launches(backward=True):
        signature = {"X": pointer(dtype), "W": pointer(dtype), "BIAS": pointer(dtype), "TARGET": "*i64",
                     "LSE": "*fp32", "COEF": "*fp32", "DX": "*fp32", "DW": "*fp32", "DB": "*fp32", "CHUNKS": "*i32",
                     "GROUPS": "*i32", "n_rows": "i32", "n_classes": "i32", "n_dims": "i32", "n_groups": "i32",
                     "stride_x": "i32", "stride_w": "i32", "stride_bias": "i32", "smoothing": "fp32"}
        signature.update({name: "constexpr" for name in constexprs})
        yield label, nested_ce_backward_kernel, signature, constexprs, options
