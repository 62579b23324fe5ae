"""Nested linear cross-entropy in plain PyTorch: the fallback for CPUs (and any device).

Not the eager loop: rows are processed in chunks sized so the chunk's logits for every dim stay within
a fixed budget, the shared head's logits at dim j are the running sum of one product per column
segment (one full-D matmul for all dims instead of sum_j m_j), and backward forms the segment gradients
G_s = sum_{j>=s} D_j as suffix sums, so dx and dW cost one full-D matmul each. Nothing of size
[N, C] outlives a chunk.

Shared layout with the Triton kernels (see ops/cross_entropy.py): `w` is the shared [C, D] head, or the
per-dim heads concatenated along columns in the caller's dims order; `bias` is None, [1, C] (shared)
or [len(dims), C] (one row per dim, caller's order). Per-row losses and LSEs are [N, len(dims)],
columns in the caller's order.
"""
from __future__ import annotations

import torch

from .prefix_norms import segments

# Bytes of fp32 logits a chunk may hold across all dims: bounds peak extra memory.
CHUNK_BYTES = 16 * 2**20


def head_offsets(dims) -> list[int]:
    """First column of each dim's head in the concatenated per-dim weight."""
    offsets, total = [], 0
    for m in dims:
        offsets.append(total)
        total += m
    return offsets


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits and gradients accumulate in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunk(n_classes: int, n_dims: int) -> int:
    return max(16, CHUNK_BYTES // (4 * n_classes * n_dims))


def boundary_logits(x, w, bias, dims, shared: bool):
    """Yields (j, fp32 logits of dims[j]) for the dims in ascending order; j is the caller's index."""
    segs, order = segments(dims)
    if shared:
        z = None
        for (a, b), j in zip(segs, order):
            part = x[:, a:b] @ w[:, a:b].T
            z = part if z is None else z + part
            yield j, z if bias is None else z + bias[0]
    else:
        offsets = head_offsets(dims)
        for j in order:
            z = x[:, :dims[j]] @ w[:, offsets[j]:offsets[j] + dims[j]].T
            yield j, z if bias is None else z + bias[j]


def _targets(target, ignore_index):
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def nested_ce_forward_torch(x, w, bias, target, dims, shared, ignore_index, label_smoothing):
    """(per-row losses, LSEs), both [N, len(dims)] in the accumulation dtype; ignored rows have loss 0."""
    n_rows, n_classes = x.shape[0], w.shape[0]
    acc = acc_dtype(x.dtype)
    losses = torch.empty((n_rows, len(dims)), dtype=acc, device=x.device)
    lse = torch.empty_like(losses)
    wf, bf = w.to(acc), None if bias is None else bias.to(acc)
    step = row_chunk(n_classes, len(dims))
    for r in range(0, n_rows, step):
        valid, tgt = _targets(target[r:r + step], ignore_index)
        for j, z in boundary_logits(x[r:r + step].to(acc), wf, bf, dims, shared):
            lse_j = z.logsumexp(1)
            loss = lse_j - (1 - label_smoothing) * z.gather(1, tgt[:, None])[:, 0]
            if label_smoothing:
                loss = loss - (label_smoothing / n_classes) * z.sum(1)
            losses[r:r + step, j] = torch.where(valid, loss, torch.zeros_like(loss))
            lse[r:r + step, j] = lse_j
    return losses, lse


def nested_ce_backward_torch(grad_losses, x, w, bias, target, lse, dims, shared, ignore_index, label_smoothing):
    """Gradients of sum(grad_losses * losses) for x, w and bias (an empty tensor when bias is None)."""
    n_rows, n_classes = x.shape[0], w.shape[0]
    segs, order = segments(dims)
    offsets = head_offsets(dims)
    acc = acc_dtype(x.dtype)
    wf, bf = w.to(acc), None if bias is None else bias.to(acc)
    dx = torch.empty_like(x)
    dw = torch.zeros_like(wf)
    db = torch.zeros_like(bf) if bias is not None else x.new_empty(0)
    step = row_chunk(n_classes, len(dims))
    for r in range(0, n_rows, step):
        xc = x[r:r + step].to(acc)
        valid, tgt = _targets(target[r:r + step], ignore_index)
        coef = grad_losses[r:r + step].to(acc) * valid[:, None]
        logits = dict(boundary_logits(xc, wf, bf, dims, shared))

        def d_logits(j):
            # d loss_j / d logits_j = softmax - (1 - eps) onehot - eps / C, scaled by the row's coefficient
            d = (logits.pop(j) - lse[r:r + step, j:j + 1]).exp_()
            d.scatter_add_(1, tgt[:, None], torch.full_like(d[:, :1], label_smoothing - 1))
            if label_smoothing:
                d -= label_smoothing / n_classes
            return d.mul_(coef[:, j:j + 1])

        dxc = torch.zeros_like(xc)
        if shared:
            grad = None
            for (a, b), j in reversed(list(zip(segs, order))):
                grad = d_logits(j) if grad is None else grad.add_(d_logits(j))  # G_s = sum_{j >= s} D_j
                dxc[:, a:b] = grad @ wf[:, a:b]
                dw[:, a:b] += grad.T @ xc[:, a:b]
            if bias is not None:
                db[0] += grad.sum(0)
        else:
            for j in order:
                d, m, o = d_logits(j), dims[j], offsets[j]
                dxc[:, :m] += d @ wf[:, o:o + m]
                dw[:, o:o + m] += d.T @ xc[:, :m]
                if bias is not None:
                    db[j] += d.sum(0)
        dx[r:r + step] = dxc
    return dx, dw.to(w.dtype), db.to(bias.dtype) if bias is not None else db
