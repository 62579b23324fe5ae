"""Nested contrastive (InfoNCE) loss on the Triton kernels: per-query, per-dim losses, differentiable.

The same contract as nested_contrastive_rows_torch (ops/contrastive_torch.py); inputs are validated by the op
(ops/contrastive.py). Z_j = diag(a_j) S_j diag(b_j) / temperature with S_j the raw prefix dot products and
a_j, b_j the inverse prefix norms (ones without normalisation).

Forward: kernels/contrastive_forward.py computes every dim's row LSE (queries against docs) and, when
symmetric, the LSE of each positive doc's column over the queries (the same kernel, roles swapped). The target
logits Z_j[i, labels[i]] are O(B * D) prefix dots here.

Backward: kernels/contrastive_backward.py, launched for queries (dq, rho) and for docs (dd, kappa), applies the
softmax parts of dL/dZ_j. The one-hot target parts (-g at (i, labels[i]); symmetric: the row and the column
one-hots both sit there, each with g/2) and the normalisation terms are O((B + M) * D) epilogues here:
    dq[:, seg_s] -= q[:, seg_s] * sum_{j>=s} rho_j a_j^2 + d[labels, seg_s] * sum_{j>=s} g_j a_j b_j[labels] / t
    dd[:, seg_s] -= d[:, seg_s] * sum_{j>=s} kappa_j b_j^2,  dd[labels, seg_s] -= q[:, seg_s] * (the same sum)
with rho_j / kappa_j the row / column sums of dL/dZ_j * Z_j (../shared/NESTED_CONTRASTIVE.md); a prefix whose
norm is clamped at eps has no norm term (F.normalize's gradient).

dtypes: fp32, bf16, fp16 (accumulated in fp32); the losses are fp32, the gradients in the inputs' dtypes.
"""
from __future__ import annotations

import torch

from .._nesting import nesting
from .contrastive_torch import inverse_prefix_norms


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def suffix_sums(t: torch.Tensor) -> torch.Tensor:
    """t[:, s:].sum(1) for every s: the dims j >= s whose prefixes contain segment s."""
    return t.flip(1).cumsum(1).flip(1)


class NestedContrastiveTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, docs, dims, temperature, labels, normalize, symmetric):
        from ..kernels.contrastive_forward import row_lse
        from ..kernels.nested_ce_forward import prefix_dots

        geo = nesting(dims)
        order = list(geo.order)
        q, d = queries.contiguous(), docs.contiguous()
        a, a_ok = inverse_prefix_norms(q, dims, normalize)  # [B, J], dims ascending; ok: norm > eps
        b, b_ok = inverse_prefix_norms(d, dims, normalize)  # [M, J]
        a, b = a.float(), b.float()
        positives = d[labels]
        target = prefix_dots(q, positives, dims, True)[:, order] * a * b[labels] / temperature
        lse = row_lse(q, d, a, b / temperature, dims)
        losses = lse - target
        col_lse = None
        if symmetric:  # column labels[i] over the queries: rows = its doc, columns = the queries
            col_lse = row_lse(positives, q, b[labels], a / temperature, dims)
            losses = (losses + col_lse - target) / 2
        ctx.save_for_backward(q, d, labels, a, b, a_ok, b_ok, target, lse, col_lse)
        ctx.options = dims, temperature, normalize, symmetric
        out = torch.empty_like(losses)
        out[:, order] = losses  # ascending -> caller's order
        return out

    @staticmethod
    def backward(ctx, grad_losses):
        from ..kernels.contrastive_backward import grad_rows, softmax_stats
        from ..kernels.nested_ce_backward import gradient_scale

        q, d, labels, a, b, a_ok, b_ok, target, lse, col_lse = ctx.saved_tensors
        dims, temperature, normalize, symmetric = ctx.options
        geo = nesting(dims)
        g = grad_losses.float()[:, list(geo.order)]  # dims ascending
        coef = g / 2 if symmetric else g  # each softmax's coefficient; the target one-hot's is g
        # The kernels cast G (|G| <= sum_j (|row coef| + max |column coef|) a_j max b_j / t) to 16 bits for the
        # tensor cores: a power of two brings its bound into [1, 2), so fp16 neither underflows nor overflows.
        column_coef = coef.abs().amax(0) if symmetric and coef.numel() else 0
        scale = gradient_scale((coef.abs() + column_coef) * a * b.amax(0) / temperature)
        query_stats = softmax_stats(coef * scale, lse)
        doc_stats = None
        if symmetric:  # doc labels[i]'s column softmax over the queries; docs that are no positive have none
            doc_stats = softmax_stats(torch.zeros_like(b), torch.full_like(b, float("inf")))
            doc_stats[labels] = softmax_stats(coef * scale, col_lse)
        dq, rho = grad_rows(q, d, a, b / temperature, query_stats, doc_stats, dims)
        dd, kappa = grad_rows(d, q, b, a / temperature, doc_stats, query_stats, dims)
        unscale = scale.reciprocal()  # exact: a power of two
        for t in (dq, rho, dd, kappa):
            t.mul_(unscale)
        target_grad = suffix_sums(g * a * b[labels] / temperature)  # the one-hot's dZ/dS, summed over j >= s
        if normalize:  # rho and kappa with the one-hot's part, times a_j^2 / b_j^2, summed over j >= s
            rho = suffix_sums(torch.where(a_ok, (rho - g * target) * a**2, 0.0))
            kappa = suffix_sums(torch.where(b_ok, kappa.index_add_(0, labels, -g * target) * b**2, 0.0))
        for s, (lo, hi) in enumerate(geo.segments):
            qs, ds = q[:, lo:hi].float(), d[:, lo:hi].float()
            dq[:, lo:hi] -= target_grad[:, s, None] * ds[labels]
            dd[:, lo:hi].index_add_(0, labels, -target_grad[:, s, None] * qs)
            if normalize:
                dq[:, lo:hi] -= rho[:, s, None] * qs
                dd[:, lo:hi] -= kappa[:, s, None] * ds
        return dq.to(q.dtype), dd.to(d.dtype), None, None, None, None, None


def nested_contrastive_rows_triton(queries, docs, dims, temperature, labels, normalize, symmetric):
    """Per-query losses [B, len(dims)] (caller's order, fp32), differentiable; see the module docstring."""
    if queries.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton contrastive kernels take fp32, bf16 or fp16 inputs, got {queries.dtype}")
    return NestedContrastiveTriton.apply(queries, docs, tuple(dims), float(temperature), labels, bool(normalize),
                                         bool(symmetric))
