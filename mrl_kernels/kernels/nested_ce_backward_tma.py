"""Backward of the nested linear cross-entropy on sm_90 for a shared head: TMA loads, whole-tile bulk reductions.

Same algorithm as nested_ce_backward (read its docstring first): a program recomputes its rows x classes
logits tile, then walks the feature columns from last to first, adding D_j = coef_j (softmax_j - onehot) to
the segment gradient G where a piece ends at boundary m_j, adding the piece's G W into dX and G^T x into dW,
and un-accumulating the piece's product to reach the previous boundary. Here every operand arrives by TMA
(tensor descriptors) and every gradient tile leaves by one bulk tensor reduction (`desc.atomic_add`, on sm_90
`cp.reduce.async.bulk.tensor`): no per-element atomics, no addresses or masks in registers.

- Whole tiles (k_start to k_end, boundaries only at their ends): BLOCK_K-wide tiles.
- Below k_start: 16-wide boxes at multiples of 16, each cut into pieces at the boundaries inside it
  (`head_pieces`); a piece's columns are selected by zeroing the others in both operands, so its dX and dW
  boxes hold zeros outside the piece and can be reduced whole.
- The accumulator starts from the bias (the forward's logits_start), so the bias gradient is the column sum
  of the final G (every dim's D_j by then), reduced once per program.
"""
import torch
import triton
import triton.language as tl

from .indexing import row_offsets
from .nested_ce_forward import LOG2E, logits_start

# Columns of the head_pieces table: box start, piece start, piece end, caller's index of the dim whose logits
# are complete at the piece's end (-1 where none is).
PIECE_FIELDS = tl.constexpr(4)


@triton.jit
def softmax_grad(z, lse, coef, cls, ok, target, smoothing, total_classes):
    """coef * (softmax(z) - (1 - smoothing) onehot(target) - smoothing / C), zero outside `ok`; `cls` are
    class ids (not chunk-local), C = total_classes."""
    p = tl.exp2((z - lse[:, None]) * LOG2E)
    d = p - tl.where(cls[None, :] == target[:, None], 1.0 - smoothing, 0.0) - smoothing / total_classes
    return tl.where(ok, d * coef[:, None], 0.0)


@triton.jit
def add_segment_grad(grad, acc, dim, cls0, n_classes, class_offset, row_ok, target, LSE, COEF, stats, smoothing,
                     total_classes, BLOCK_N: tl.constexpr):
    """grad + D_dim for the finished logits tile `acc` of dim `dim` (classes cls0 + [0, BLOCK_N) of a launch
    whose chunk of n_classes starts at class_offset); rows and classes past the end get zeros. The class
    vector is formed here rather than kept across the loops, where it would hold registers in the MMA layout."""
    cls = cls0 + tl.arange(0, BLOCK_N)
    ok = row_ok[:, None] & (cls < n_classes)[None, :]
    lse = tl.load(LSE + stats + dim, mask=row_ok, other=0.0)
    coef = tl.load(COEF + stats + dim, mask=row_ok, other=0.0)
    return grad + softmax_grad(acc, lse, coef, class_offset + cls, ok, target, smoothing, total_classes)


@triton.jit
def grouped_tile(pid, row_tiles, class_tiles, GROUP_M: tl.constexpr):
    """(row tile, class tile) of program `pid` in grouped order: GROUP_M row tiles sweep the class tiles
    together, so programs running at once share their class tile's W and revisit the same GROUP_M row tiles of
    x, which stay in L2 (in row-major order every class tile would stream all of x again)."""
    per_group = GROUP_M * class_tiles
    first = pid // per_group * GROUP_M
    size = tl.minimum(row_tiles - first, GROUP_M)
    return first + pid % per_group % size, pid % per_group // size


@triton.jit
def piece_boxes(x_desc, w_desc, row0, cls0, a, c0, c1, BOX: tl.constexpr):
    """The x and W boxes at column a with the columns outside [c0, c1) zeroed."""
    cols = a + tl.arange(0, BOX)
    inside = ((cols >= c0) & (cols < c1))[None, :]
    return tl.where(inside, x_desc.load([row0, a]), 0.0), tl.where(inside, w_desc.load([cls0, a]), 0.0)


@triton.jit
def nested_ce_backward_tma_kernel(
    BIAS_COLS, TARGET, LSE, COEF, FOLD_AT, PIECES, X_DESC, W_DESC, X_BOX_DESC, W_BOX_DESC, BIAS_DESC,
    DX_DESC, DW_DESC, DX_BOX_DESC, DW_BOX_DESC, DB_DESC,
    n_rows, n_classes, class_offset, total_classes, n_dims, n_pieces, k_start, k_end, smoothing,
    BOX: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row_tile, class_tile = grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_classes, BLOCK_N),
                                        GROUP_M)
    row0 = row_tile * BLOCK_M
    cls0 = class_tile * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    target = tl.load(TARGET + rows, mask=row_ok, other=-1)
    stats = row_offsets(rows, n_dims)  # LSE and COEF are [n_rows, n_dims]
    dtype = X_DESC.dtype
    # The full logits: the columns below k_start in boxes (the last one cut at k_start), then whole tiles.
    acc = logits_start(BIAS_COLS, BIAS_DESC, 0, cls0, True, dtype, PRECISION, BLOCK_M, BLOCK_N)
    for a in range(0, k_start, BOX):
        xb, wb = piece_boxes(X_BOX_DESC, W_BOX_DESC, row0, cls0, a, a, k_start, BOX)
        acc = tl.dot(xb, tl.trans(wb), acc, input_precision=PRECISION)
    for k in range(k_start, k_end, BLOCK_K):
        acc = tl.dot(X_DESC.load([row0, k]), tl.trans(W_DESC.load([cls0, k])), acc, input_precision=PRECISION)
    grad = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    n_tiles = (k_end - k_start) // BLOCK_K
    for back in range(n_tiles):  # whole tiles, last to first
        k = k_end - (back + 1) * BLOCK_K
        dim = tl.load(FOLD_AT + n_tiles - 1 - back)
        if dim >= 0:  # acc holds logits_dim: add D_dim to the segment gradient
            grad = add_segment_grad(grad, acc, dim, cls0, n_classes, class_offset, row_ok, target, LSE, COEF, stats,
                                    smoothing, total_classes, BLOCK_N)
        xt = X_DESC.load([row0, k])
        wt = W_DESC.load([cls0, k])
        g = grad.to(dtype)
        DX_DESC.atomic_add([row0, k], tl.dot(g, wt, input_precision=PRECISION))
        DW_DESC.atomic_add([cls0, k], tl.dot(tl.trans(g), xt, input_precision=PRECISION))
        acc -= tl.dot(xt, tl.trans(wt), input_precision=PRECISION)  # step back to the previous boundary
    for piece in range(n_pieces):  # then the pieces below k_start, last to first
        a = tl.load(PIECES + piece * PIECE_FIELDS)
        c0 = tl.load(PIECES + piece * PIECE_FIELDS + 1)
        c1 = tl.load(PIECES + piece * PIECE_FIELDS + 2)
        dim = tl.load(PIECES + piece * PIECE_FIELDS + 3)
        if dim >= 0:
            grad = add_segment_grad(grad, acc, dim, cls0, n_classes, class_offset, row_ok, target, LSE, COEF, stats,
                                    smoothing, total_classes, BLOCK_N)
        xb, wb = piece_boxes(X_BOX_DESC, W_BOX_DESC, row0, cls0, a, c0, c1, BOX)
        g = grad.to(dtype)
        DX_BOX_DESC.atomic_add([row0, a], tl.dot(g, wb, input_precision=PRECISION))  # zeros outside the piece
        DW_BOX_DESC.atomic_add([cls0, a], tl.dot(tl.trans(g), xb, input_precision=PRECISION))
        acc -= tl.dot(xb, tl.trans(wb), input_precision=PRECISION)
    DB_DESC.atomic_add([0, cls0], tl.sum(grad, axis=0)[None, :])


def head_pieces(dims, k_start: int, box: int) -> torch.Tensor:
    """int32 [n, PIECE_FIELDS] rows (box start, piece start, piece end, dim at the piece's end or -1): the columns
    below k_start cut at every box edge (multiples of `box`) and every boundary, last piece first."""
    ends = {m: j for j, m in enumerate(dims) if m <= k_start}
    cuts = sorted(set(range(0, k_start, box)) | set(ends) | {k_start}) if k_start else []
    rows = [(c0 // box * box, c0, c1, ends.get(c1, -1)) for c0, c1 in zip(cuts[:-1], cuts[1:])]
    return torch.tensor(rows[::-1], dtype=torch.int32).reshape(-1, PIECE_FIELDS.value)
