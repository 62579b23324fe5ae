"""mk.matryoshka_contrastive_loss: in-batch InfoNCE at every nesting dim."""
from __future__ import annotations

import torch

from .. import reference
from ._backend import resolve_backend
from .._nesting import acc_dtype
from .contrastive_torch import nested_contrastive_rows_torch, nested_contrastive_total_torch
from .contrastive_triton import nested_contrastive_rows_triton
from ._validation import (REDUCTIONS, check_choice, check_dim_weights, check_dims, check_finite, check_labels,
                          check_like, check_tensor)

# "auto" takes the chunked torch path (ops/contrastive_torch.py) on every device: the Triton kernels
# (ops/contrastive_triton.py) are exact under the interpreter but have not been timed on a GPU yet, so they run
# only when asked for. "reference" is the eager per-dim loop.
IMPLEMENTED = ("torch", "triton", "reference")


def matryoshka_contrastive_loss(queries, docs, dims, temperature=0.05, labels=None, normalize=True,
                                symmetric=False, dim_weights=None, reduction="mean", gather=False,
                                return_per_dim=False, backend="auto"):
    """sum_j dim_weights[j] * InfoNCE_j, where InfoNCE_j scores queries[:, :m_j] against docs[:, :m_j]
    (cosine when normalize=True: each prefix is re-normalised) divided by `temperature`, and takes the
    cross-entropy against `labels` (default: query i's positive is doc i; docs past the first B are extra
    negatives). symmetric=True averages in the doc-to-query direction (CLIP). gather=True all-gathers
    docs from every torch.distributed rank first, with gradients, so each query sees every rank's docs
    (and, when symmetric, each doc every rank's queries); every rank must pass the same numbers of queries
    and docs, and the sum of the ranks' losses (reduction="sum") is the loss of the concatenated batch.
    Reductions and return_per_dim work as in matryoshka_linear_cross_entropy, over queries.
    """
    check_tensor(queries, "queries", ndim=2)
    check_tensor(docs, "docs", ndim=2)
    check_like(docs, "docs", queries, "queries")
    n_queries, full_dim = queries.shape
    if docs.shape[1] != full_dim:
        raise ValueError(f"docs must be [M, {full_dim}] like queries, got {tuple(docs.shape)}")
    dims = check_dims(dims, full_dim)
    temperature = check_finite(temperature, "temperature", positive=True)
    dim_weights = check_dim_weights(dim_weights, len(dims))
    check_choice(reduction, "reduction", REDUCTIONS)
    if labels is None:
        if docs.shape[0] < n_queries:
            raise ValueError(f"docs must have at least as many rows as queries ({n_queries}) when labels is None, "
                             f"got {docs.shape[0]}")
        labels = torch.arange(n_queries, device=queries.device)
    else:
        labels = check_labels(labels, "labels", n_queries, docs.shape[0], queries, "queries")
        if symmetric and labels.unique().numel() != n_queries:
            raise ValueError("labels must be unique when symmetric=True (each doc is the positive of one query)")
    backend = resolve_backend("matryoshka_contrastive_loss", backend, queries.device, IMPLEMENTED)
    options = dict(temperature=temperature, normalize=normalize, dim_weights=dim_weights, reduction=reduction,
                   return_per_dim=return_per_dim)
    terms = _terms(queries, docs, labels, symmetric, gather)
    if backend == "reference" and len(terms) == 1:
        rows, columns, labels, symmetric = terms[0]
        return reference.nested_contrastive_loss(rows, columns, dims, labels=labels, symmetric=symmetric, **options)
    weights = torch.tensor(dim_weights, dtype=acc_dtype(queries.dtype), device=queries.device)
    if backend == "torch" and reduction != "none":  # a scalar loss: gradients computed in the forward
        coef = weights / len(terms) / (n_queries if reduction == "mean" else 1)
        totals, per_rows = zip(*(nested_contrastive_total_torch(rows, columns, dims, temperature, term_labels,
                                                                normalize, term_symmetric, coef)
                                 for rows, columns, term_labels, term_symmetric in terms))
        total, per_row = sum(totals), sum(per_rows) / len(terms)
        per_dim = per_row.mean(0) if reduction == "mean" else per_row.sum(0)
    else:
        per_row = sum(_rows(backend, rows, columns, dims, temperature, term_labels, normalize, term_symmetric)
                      for rows, columns, term_labels, term_symmetric in terms) / len(terms)
        per_dim = per_row.mean(0) if reduction == "mean" else per_row.sum(0) if reduction == "sum" else per_row
        total = per_dim @ weights
    total = total.to(queries.dtype)
    return (total, per_dim.detach().to(queries.dtype)) if return_per_dim else total


def _rows(backend, queries, docs, dims, temperature, labels, normalize, symmetric):
    """Per-query losses [B, len(dims)] (caller's order), differentiable."""
    if backend == "torch":
        return nested_contrastive_rows_torch(queries, docs, dims, temperature, labels, normalize, symmetric)
    if backend == "triton":
        return nested_contrastive_rows_triton(queries, docs, dims, temperature, labels, normalize, symmetric)
    return torch.stack([reference.nested_contrastive_loss(queries, docs, (m,), temperature=temperature,
                                                          labels=labels, normalize=normalize, symmetric=symmetric,
                                                          reduction="none") for m in dims], 1)


def _terms(queries, docs, labels, symmetric, gather):
    """The (rows, columns, labels, symmetric) problems whose per-row losses average to this rank's loss.

    gather=True: this rank's queries against every rank's docs; with symmetric=True the doc-to-query term
    needs every rank's queries too, so it is a second one-way problem with the roles swapped: this rank's
    positive docs as rows against all queries (the row-CE of the transposed score matrix), averaged in."""
    if not gather:
        return [(queries, docs, labels, symmetric)]
    all_docs, doc_offset = _gather_rows(docs, "docs")
    labels = labels + doc_offset
    if not symmetric:
        return [(queries, all_docs, labels, False)]
    all_queries, query_offset = _gather_rows(queries, "queries")
    own_queries = torch.arange(queries.shape[0], device=queries.device) + query_offset
    return [(queries, all_docs, labels, False), (all_docs[labels], all_queries, own_queries, False)]


def _gather_rows(x: torch.Tensor, name: str):
    """All-gather x's rows over the default process group, differentiably: (every rank's rows, this rank's
    offset). Every rank must pass the same number of rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather=True needs an initialized torch.distributed process group")
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)  # a mismatch would make the gather below fail obscurely, or hang
    if any(int(c) != x.shape[0] for c in counts):
        raise ValueError(f"gather=True needs the same number of {name} on every rank, got "
                         f"{[int(c) for c in counts]}")
    # The functional collective keeps the autograd edge (its backward reduce-scatters the gradient), which
    # torch.distributed.all_gather does not.
    import torch.distributed._functional_collectives as collectives

    # all_gather_single_autograd replaces all_gather_tensor_autograd in newer torch releases.
    gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
    gathered = gather(x.contiguous(), gather_dim=0, group=dist.group.WORLD)
    return gathered, dist.get_rank() * x.shape[0]
