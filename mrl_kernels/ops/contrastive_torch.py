"""Nested contrastive (InfoNCE) loss in plain PyTorch, chunked: the fallback for CPUs (and any device).

Not the eager loop (one normalise, one B x M matmul and one cross-entropy per dim, each writing a fresh
score matrix, then autograd through all of them): queries are processed in row chunks sized so the chunk's
scores for every dim stay within CHUNK_BYTES, and a chunk's raw prefix dot products S_j are the running
sum of one product per column segment (one walk over the features for all dims). The per-prefix cosine
scales are applied to S_j afterwards: Z_j = diag(a_j) S_j diag(b_j) / temperature, with a_j, b_j the
inverse prefix norms of queries and docs. Nothing of size B x M outlives a chunk.

Backward recomputes each chunk's S_j and forms, with D_j = dL/dZ_j (row and, when symmetric, column
cross-entropy terms), the segment gradient G_s = sum_{j>=s} diag(a_j) D_j diag(b_j) / temperature as a
suffix sum over the dims, so dq and dd cost one full-width matmul each:
    dq[:, seg_s] = G_s d[:, seg_s] - q[:, seg_s] * sum_{j>=s} rho_j a_j^2,   rho_j = rowsum(D_j * Z_j)
    dd[:, seg_s] = G_s^T q[:, seg_s] - d[:, seg_s] * sum_{j>=s} kappa_j b_j^2, kappa_j = colsum(D_j * Z_j)
(the second terms are the derivative through the normalisation; see ../shared/NESTED_CONTRASTIVE.md). The
symmetric term's column log-sum-exps are merged across row chunks in the forward and saved.

Returns per-query, per-dim losses [B, len(dims)] (caller's order); weights and reductions are applied by
the op on top, under autograd.
"""
from __future__ import annotations

import torch

from .._nesting import acc_dtype, nesting
from .prefix_norms_torch import prefix_norms_torch

# fp32 bytes of scores a row chunk may hold across all dims (the S_j plus a few B x M temporaries): about a
# CPU's last-level cache, where the measured prototype ran 2.7-4.5x faster than the eager loop.
CHUNK_BYTES = 16 * 2**20
NORM_EPS = 1e-12  # F.normalize's: a prefix norm below it is clamped, and its gradient through the norm is 0


def row_chunk(n_docs: int, n_dims: int) -> int:
    return max(1, CHUNK_BYTES // (4 * n_docs * (n_dims + 4)))


def inverse_prefix_norms(x: torch.Tensor, dims, normalize: bool):
    """(1 / max(||x[:, :m_j]||, eps), whether ||x[:, :m_j]|| > eps), each [N, len(dims)] in ascending-dim order;
    ones and all-True without normalisation."""
    if not normalize:
        ones = x.new_ones((x.shape[0], len(dims)))
        return ones, ones.bool()
    norms = prefix_norms_torch(x, nesting(dims).ascending)
    return 1 / norms.clamp_min(NORM_EPS), norms > NORM_EPS


def prefix_scores(q_rows, d, dims):
    """The raw prefix dot products S_j = q_rows[:, :m_j] @ d[:, :m_j]^T for the dims ascending (a list), as
    running sums of one product per column segment."""
    scores, total = [], None
    for a, b in nesting(dims).segments:
        part = q_rows[:, a:b] @ d[:, a:b].T
        total = part if total is None else total + part
        scores.append(total)
    return scores


def label_columns(labels: torch.Tensor, n_queries: int):
    """The positives' columns of a score chunk: a slice when labels are 0..B-1 (the default), so the symmetric
    term reads and writes a view instead of gathering and scattering B columns per dim."""
    if torch.equal(labels, torch.arange(n_queries, device=labels.device)):
        return slice(0, n_queries)
    return labels


class NestedContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, docs, dims, temperature, labels, normalize, symmetric):
        geo = nesting(dims)
        q, d = queries.to(acc_dtype(queries.dtype)), docs.to(acc_dtype(docs.dtype))
        n_queries, n_dims = q.shape[0], len(dims)
        a, _ = inverse_prefix_norms(q, dims, normalize)
        b, _ = inverse_prefix_norms(d, dims, normalize)
        row_lse = q.new_empty((n_queries, n_dims))
        target = q.new_empty((n_queries, n_dims))
        col_lse = q.new_full((n_queries, n_dims), float("-inf")) if symmetric else None
        columns = label_columns(labels, n_queries)
        step = row_chunk(d.shape[0], n_dims)
        for r0 in range(0, n_queries, step):
            rows = slice(r0, r0 + step)
            own = torch.arange(r0, min(r0 + step, n_queries), device=q.device)
            for s, scores in enumerate(prefix_scores(q[rows], d, dims)):
                z = scores.mul_(a[rows, s, None] * b[None, :, s] / temperature)
                row_lse[rows, s] = torch.logsumexp(z, 1)
                target[rows, s] = z[own - r0, labels[own]]
                if symmetric:  # column labels[k] over this chunk's queries, merged into the running LSE
                    col_lse[:, s] = torch.logaddexp(col_lse[:, s], torch.logsumexp(z[:, columns], 0))
        losses = row_lse - target
        if symmetric:
            losses = (losses + col_lse - target) / 2
        ctx.save_for_backward(queries, docs, labels, row_lse, col_lse if symmetric else row_lse)
        ctx.options = dims, temperature, normalize, symmetric
        order = torch.tensor(geo.order, device=q.device)
        out = torch.empty_like(losses)
        out[:, order] = losses  # ascending -> caller's order
        return out.to(acc_dtype(queries.dtype))

    @staticmethod
    def backward(ctx, grad_losses):
        queries, docs, labels, row_lse, col_lse = ctx.saved_tensors
        dims, temperature, normalize, symmetric = ctx.options
        geo = nesting(dims)
        q, d = queries.to(acc_dtype(queries.dtype)), docs.to(acc_dtype(docs.dtype))
        n_queries, n_dims = q.shape[0], len(dims)
        a, q_ok = inverse_prefix_norms(q, dims, normalize)
        b, d_ok = inverse_prefix_norms(d, dims, normalize)
        coef = grad_losses.to(q.dtype)[:, list(geo.order)] * (0.5 if symmetric else 1.0)  # ascending dims
        dq, dd = torch.zeros_like(q), torch.zeros_like(d)
        kappa = d.new_zeros((d.shape[0], n_dims))
        columns = label_columns(labels, n_queries)
        step = row_chunk(d.shape[0], n_dims)
        for r0 in range(0, n_queries, step):
            rows = slice(r0, r0 + step)
            own = torch.arange(r0, min(r0 + step, n_queries), device=q.device)
            scores = prefix_scores(q[rows], d, dims)
            grad, rho_sum = None, q.new_zeros(own.shape[0])
            for s in reversed(range(n_dims)):  # last dim first: G and the norm terms are suffix sums
                scale = a[rows, s, None] * b[None, :, s] / temperature
                z = scores[s].mul_(scale)
                dz = torch.exp(z - row_lse[rows, s, None]).mul_(coef[rows, s, None])
                dz[own - r0, labels[own]] -= coef[rows, s]
                if symmetric:  # column labels[k]: softmax over all queries, target k
                    cc = coef[:, s]
                    col = torch.exp(z[:, columns] - col_lse[None, :, s]).mul_(cc[None, :])
                    col[own - r0, own] -= cc[own]
                    dz[:, columns] += col
                if normalize:
                    dz_z = dz * z
                    rho_sum += dz_z.sum(1) * a[rows, s] ** 2 * q_ok[rows, s]
                    kappa[:, s] += dz_z.sum(0)
                dz.mul_(scale)
                grad = dz if grad is None else grad.add_(dz)
                lo, hi = geo.segments[s]
                dq[rows, lo:hi] = grad @ d[:, lo:hi] - q[rows, lo:hi] * rho_sum[:, None]
                dd[:, lo:hi] += grad.T @ q[rows, lo:hi]
        if normalize:
            kappa_sum = (kappa * b ** 2 * d_ok).flip(1).cumsum(1).flip(1)  # sum over j >= s
            for s, (lo, hi) in enumerate(geo.segments):
                dd[:, lo:hi] -= d[:, lo:hi] * kappa_sum[:, s, None]
        return dq.to(queries.dtype), dd.to(docs.dtype), None, None, None, None, None


def nested_contrastive_rows_torch(queries, docs, dims, temperature, labels, normalize, symmetric):
    """Per-query losses [B, len(dims)] (caller's order) of the chunked path, differentiable."""
    return NestedContrastive.apply(queries, docs, tuple(dims), float(temperature), labels, bool(normalize),
                                   bool(symmetric))
