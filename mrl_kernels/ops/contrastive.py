"""mk.matryoshka_contrastive_loss: in-batch InfoNCE at every nesting dim."""
from __future__ import annotations

import torch

from .. import reference
from ._backend import resolve_backend
from .contrastive_torch import nested_contrastive_rows_torch
from ._validation import (REDUCTIONS, check_choice, check_dim_weights, check_dims, check_finite, check_labels,
                          check_like, check_tensor)

# "auto" takes the chunked torch path (ops/contrastive_torch.py); "reference" is the eager per-dim loop.
IMPLEMENTED = ("torch", "reference")


def matryoshka_contrastive_loss(queries, docs, dims, temperature=0.05, labels=None, normalize=True,
                                symmetric=False, dim_weights=None, reduction="mean", gather=False,
                                return_per_dim=False, backend="auto"):
    """sum_j dim_weights[j] * InfoNCE_j, where InfoNCE_j scores queries[:, :m_j] against docs[:, :m_j]
    (cosine when normalize=True: each prefix is re-normalised) divided by `temperature`, and takes the
    cross-entropy against `labels` (default: query i's positive is doc i; docs past the first B are extra
    negatives). symmetric=True averages in the doc-to-query direction (CLIP). gather=True all-gathers
    docs from every torch.distributed rank first, with gradients, so each query sees every rank's docs
    (every rank must pass the same number of docs). Reductions and return_per_dim work as in
    matryoshka_linear_cross_entropy, over queries.
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
    if gather:
        if symmetric:
            raise ValueError("symmetric=True with gather=True is not supported: the doc-to-query term would "
                             "need every rank's queries")
        docs, rank_offset = _gather_docs(docs)
        labels = labels + rank_offset
    backend = resolve_backend("matryoshka_contrastive_loss", backend, queries.device, IMPLEMENTED)
    if backend == "reference":
        return reference.nested_contrastive_loss(queries, docs, dims, temperature=temperature, labels=labels,
                                                 normalize=normalize, symmetric=symmetric, dim_weights=dim_weights,
                                                 reduction=reduction, return_per_dim=return_per_dim)
    losses = nested_contrastive_rows_torch(queries, docs, dims, temperature, labels, normalize, symmetric)
    per_dim = losses.mean(0) if reduction == "mean" else losses.sum(0) if reduction == "sum" else losses
    total = (per_dim @ torch.tensor(dim_weights, dtype=per_dim.dtype, device=per_dim.device)).to(queries.dtype)
    return (total, per_dim.detach().to(queries.dtype)) if return_per_dim else total


def _gather_docs(docs: torch.Tensor):
    """All-gather docs over the default process group, differentiably; returns (all docs, this rank's offset)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather=True needs an initialized torch.distributed process group")
    # The functional collective keeps the autograd edge (its backward reduce-scatters the gradient), which
    # torch.distributed.all_gather does not.
    import torch.distributed._functional_collectives as collectives

    # all_gather_single_autograd replaces all_gather_tensor_autograd in newer torch releases.
    gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
    gathered = gather(docs.contiguous(), gather_dim=0, group=dist.group.WORLD)
    return gathered, dist.get_rank() * docs.shape[0]
