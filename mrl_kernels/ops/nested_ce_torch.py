"""Nested linear cross-entropy in plain PyTorch: the fallback for CPUs (and any device).

Not the eager loop: rows are processed in chunks sized so the chunk's logits for every dim stay within
a fixed budget, the shared head's logits at dim j are the running sum of one product per column
segment (one full-D matmul for all dims instead of sum_j m_j), and backward forms the segment gradients
G_s = sum_{j>=s} D_j as suffix sums, so dx and dW cost one full-D matmul each. Nothing of size
[N, C] outlives a chunk.

Shared layout with the Triton kernels (see ops/nested_ce.py): `w` is the shared [C, D] head, or the
per-dim heads concatenated along columns in the caller's dims order; `bias` is None, [1, C] (shared)
or [len(dims), C] (one row per dim, caller's order). Per-row losses and LSEs are [N, len(dims)],
columns in the caller's order.
"""
from __future__ import annotations

import functools

import torch

from .._nesting import acc_dtype, nesting

# Bytes of fp32 logits a chunk may hold across all dims: bounds the path's peak extra memory (the chunk's
# logits and their gradient). CPU: 8 MB, of the order of a CPU's last-level cache, and still 2M logits per
# chunk, so per-chunk op overhead is small next to the chunk's matmuls. GPU: each chunk costs a few hundred
# kernel launches, so chunks are large there (small ones made the path launch-bound); 2 GB is a few percent
# of the memory of the GPUs the library targets.
CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 2 * 2**30}


def row_chunk(n_classes: int, n_dims: int, device: torch.device) -> int:
    return max(16, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"]) // (4 * n_classes * n_dims))


def boundary_logits(x, w, bias, dims, shared: bool):
    """Yields (j, fp32 logits of dims[j]) for the dims in ascending order; j is the caller's index."""
    geo = nesting(dims)
    if shared:
        z = None
        for (a, b), j in zip(geo.segments, geo.order):
            part = x[:, a:b] @ w[:, a:b].T
            z = part if z is None else z + part
            yield j, z if bias is None else z + bias[0]
    else:
        for j in geo.order:
            z = x[:, :dims[j]] @ w[:, geo.offsets[j]:geo.offsets[j] + dims[j]].T
            yield j, z if bias is None else z + bias[j]


def _targets(target, ignore_index):
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def _chunk_losses(logits: dict, tgt, valid, label_smoothing, to_probs: bool = False):
    """Per-row losses and LSEs [R, len(dims)] of one chunk from its logits {j: [R, C]}. With to_probs the
    logits are replaced by the softmax probabilities, which the gradient needs next."""
    n_classes = next(iter(logits.values())).shape[1]
    losses, lse = [], []
    for j in range(len(logits)):
        log_p = logits[j].log_softmax(1)
        loss = -(1 - label_smoothing) * log_p.gather(1, tgt[:, None])[:, 0]
        if label_smoothing:
            loss -= (label_smoothing / n_classes) * log_p.sum(1)
        losses.append(loss)
        lse.append(logits[j][:, 0] - log_p[:, 0])  # log p_c = z_c - lse for any class c
        if to_probs:
            logits[j] = log_p.exp_()
    losses = torch.stack(losses, 1)
    return torch.where(valid[:, None], losses, torch.zeros_like(losses)), torch.stack(lse, 1)


def _chunk_grads(xc, wf, logits: dict, lse, coef, tgt, dims, shared, label_smoothing, dxc, dw, db):
    """Adds one chunk's gradients to dxc (its rows of dx, zeros), dw and db (None without bias). Consumes
    `logits`, which hold logits (turned into probabilities with `lse`) or, where lse is None, probabilities."""
    n_classes = wf.shape[0]
    geo = nesting(dims)

    def d_logits(j):
        # d loss_j / d logits_j = softmax - (1 - eps) onehot - eps / C, scaled by the row's coefficient
        d = logits.pop(j)
        if lse is not None:
            d.sub_(lse[:, j:j + 1]).exp_()
        d.scatter_add_(1, tgt[:, None], torch.full_like(d[:, :1], label_smoothing - 1))
        if label_smoothing:
            d -= label_smoothing / n_classes
        return d.mul_(coef[:, j:j + 1])

    if shared:
        grad = None
        for (a, b), j in reversed(list(zip(geo.segments, geo.order))):
            grad = d_logits(j) if grad is None else grad.add_(d_logits(j))  # G_s = sum_{j >= s} D_j
            dxc[:, a:b] = grad @ wf[:, a:b]
            dw[:, a:b].addmm_(grad.T, xc[:, a:b])
        if db is not None:
            db[0] += grad.sum(0)
    else:
        for j in geo.order:
            d, m, o = d_logits(j), dims[j], geo.offsets[j]
            dxc[:, :m].addmm_(d, wf[:, o:o + m])
            dw[:, o:o + m].addmm_(d.T, xc[:, :m])
            if db is not None:
                db[j] += d.sum(0)


def _chunks(x, w, bias, target, dims, shared, ignore_index):
    """Yields (row slice, x chunk, fp32 head, fp32 bias, valid rows, safe targets, logits {j: [R, C]})."""
    acc = acc_dtype(x.dtype)
    wf, bf = w.to(acc), None if bias is None else bias.to(acc)
    step = row_chunk(w.shape[0], len(dims), x.device)
    for r in range(0, x.shape[0], step):
        rows = slice(r, r + step)
        xc = x[rows].to(acc)
        valid, tgt = _targets(target[rows], ignore_index)
        yield rows, xc, wf, bf, valid, tgt, dict(boundary_logits(xc, wf, bf, dims, shared))


def _grad_buffers(x, w, bias):
    """Zeroed dx, dw, db (None without bias) in the accumulation dtype: zeroed once here rather than per
    chunk, where fresh pages cost more than the arithmetic."""
    zeros = functools.partial(torch.zeros, dtype=acc_dtype(x.dtype), device=x.device)
    return zeros(x.shape), zeros(w.shape), None if bias is None else zeros(bias.shape)


def _finish_grads(dx, dw, db, x, w, bias):
    return dx.to(x.dtype), dw.to(w.dtype), db.to(bias.dtype) if bias is not None else dx.new_empty(0)


def nested_ce_forward_torch(x, w, bias, target, dims, shared, ignore_index, label_smoothing):
    """(per-row losses, LSEs), both [N, len(dims)] in the accumulation dtype; ignored rows have loss 0."""
    acc = acc_dtype(x.dtype)
    losses = torch.empty((x.shape[0], len(dims)), dtype=acc, device=x.device)
    lse = torch.empty_like(losses)
    for rows, _, _, _, valid, tgt, logits in _chunks(x, w, bias, target, dims, shared, ignore_index):
        losses[rows], lse[rows] = _chunk_losses(logits, tgt, valid, label_smoothing)
    return losses, lse


def nested_ce_backward_torch(grad_losses, x, w, bias, target, lse, dims, shared, ignore_index, label_smoothing):
    """Gradients of sum(grad_losses * losses) for x, w and bias (an empty tensor when bias is None),
    recomputing each chunk's logits."""
    dx, dw, db = _grad_buffers(x, w, bias)
    for rows, xc, wf, _, valid, tgt, logits in _chunks(x, w, bias, target, dims, shared, ignore_index):
        coef = grad_losses[rows].to(xc.dtype) * valid[:, None]
        _chunk_grads(xc, wf, logits, lse[rows], coef, tgt, dims, shared, label_smoothing, dx[rows], dw, db)
    return _finish_grads(dx, dw, db, x, w, bias)


def nested_ce_with_grads_torch(x, w, bias, target, dims, shared, ignore_index, label_smoothing, dim_weights,
                               mean: bool):
    """For a scalar loss (reduction "mean" or "sum"), the gradient is known up to the upstream scalar while
    the logits are at hand, so each chunk's logits serve the loss and the gradients at once: one matmul
    for the logits, one for dx, one for dW, and no recompute (the eager loop pays about six).
    Returns (per-dim losses [len(dims)] reduced over rows, dx, dw, db) for the unit upstream gradient."""
    acc = acc_dtype(x.dtype)
    dx, dw, db = _grad_buffers(x, w, bias)
    per_dim = torch.zeros(len(dims), dtype=acc, device=x.device)
    scale = 1.0 / (target != ignore_index).sum().to(acc) if mean else torch.ones((), dtype=acc, device=x.device)
    weights = torch.tensor(dim_weights, dtype=acc, device=x.device) * scale
    for rows, xc, wf, _, valid, tgt, logits in _chunks(x, w, bias, target, dims, shared, ignore_index):
        losses, _ = _chunk_losses(logits, tgt, valid, label_smoothing, to_probs=True)
        per_dim += losses.sum(0)
        coef = torch.where(valid[:, None], weights, torch.zeros_like(weights))
        _chunk_grads(xc, wf, logits, None, coef, tgt, dims, shared, label_smoothing, dx[rows], dw, db)
    return (per_dim * scale,) + _finish_grads(dx, dw, db, x, w, bias)
