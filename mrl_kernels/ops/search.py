"""mk.prefix_topk: exact top-k on a prefix of stored full vectors."""
from __future__ import annotations

from .. import reference
from ._backend import resolve_backend
from ._validation import check_all_finite, check_choice, check_int, check_like, check_tensor

METRICS = ("ip", "cosine", "l2")
IMPLEMENTED = ("reference",)


def prefix_topk(queries, database, k, dim=None, metric="ip", backend="auto"):
    """The k best database rows for each query, scored on the first `dim` dims (all D when None).

    metric: "ip" (inner product), "cosine" (each prefix re-normalised) or "l2" (squared euclidean
    distance). Returns (scores [Q, k], ids [Q, k] int64), best first: descending scores for ip and
    cosine, ascending distances for l2.
    """
    check_tensor(queries, "queries", ndim=2)
    check_tensor(database, "database", ndim=2)
    check_like(database, "database", queries, "queries")
    full_dim = database.shape[1]
    if queries.shape[1] != full_dim:
        raise ValueError(f"queries must be [Q, {full_dim}] like database, got {tuple(queries.shape)}")
    k = check_int(k, "k", 1, database.shape[0])
    dim = full_dim if dim is None else check_int(dim, "dim", 1, full_dim)
    check_choice(metric, "metric", METRICS)
    check_all_finite(queries[:, :dim], "queries")
    backend = resolve_backend("prefix_topk", backend, queries.device, IMPLEMENTED)
    return reference.prefix_topk(queries, database, k, dim=dim, metric=metric)
