"""Sharded search over torch.distributed: each rank holds one shard (its own MatryoshkaIndex).

``index.search(..., distributed=True)`` (or :func:`sharded_search`): every rank passes the same queries.
Shard sizes are all-gathered, giving each rank the global id offset of its shard (the sum of the sizes of
lower ranks); each rank searches its shard, the candidates (scores, local ids + offset) are all-gathered
and merged into the global top-k, returned on every rank. The result equals a single search over the
concatenated shards (ties aside).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops._validation import check_int
from ..ops.search_torch import merge_topk


def sharded_search(index, queries, k: int, dim: int | None = None, *, group=None,
                   batch_size: int = 4096, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact top-k over the union of every rank's shard (``index``: this rank's MatryoshkaIndex); call it
    on every rank with the same queries.

    Ids are global: a shard's rows are numbered after those of all lower ranks (offset = the sum of
    the all-gathered shard sizes of lower ranks). Each rank searches its shard for min(k, its size)
    candidates (padded to k with the worst score and id -1), the candidates are all-gathered and the
    global top-k is selected; every rank gets the same (scores [Q, k] float32, ids [Q, k] int64) on
    ``index.device``. Communication tensors live on the CPU for gloo and on the current CUDA device for
    nccl. An empty shard is allowed as long as k <= the global size.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("distributed=True (sharded_search) needs an initialised torch.distributed process "
                         "group: call torch.distributed.init_process_group(...) on every rank first, or "
                         "search this index alone with distributed=False")
    # Local checks before any collective (a rank that raised later would leave the others hanging).
    q = index.check_query_shape(queries)
    if dim is not None and index.dim is not None:
        check_int(dim, "dim", 1, index.dim)
    index.search_backend("search", backend)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    mine = torch.tensor([len(index), q.shape[0], q.shape[1]], dtype=torch.int64, device=comm)
    info = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(info, mine, group=group)
    info = torch.stack(info).cpu()
    if (info[:, 1:] != info[0, 1:]).any():
        raise ValueError(f"every rank must pass the same number of queries of the same dim; got "
                         f"[Q, dim] = {info[:, 1:].tolist()} by rank")
    sizes = info[:, 0]
    total = int(sizes.sum())
    if total == 0:
        raise ValueError("the index is empty on every rank: add vectors before searching")
    k = check_int(k, "k", 1, total)
    offset = int(sizes[:rank].sum())
    nq = q.shape[0]
    worst = math.inf if index.metric == "l2" else -math.inf
    scores = torch.full((nq, k), worst, dtype=torch.float32, device=comm)
    ids = torch.full((nq, k), -1, dtype=torch.int64, device=comm)
    n_local = len(index)
    if n_local:
        ls, li = index.search(q, min(k, n_local), dim, batch_size=batch_size, backend=backend)
        scores[:, : ls.shape[1]] = ls.to(device=comm, dtype=torch.float32)
        ids[:, : li.shape[1]] = li.to(comm) + offset
    all_s = [torch.empty_like(scores) for _ in range(world)]
    all_i = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_s, scores, group=group)
    dist.all_gather(all_i, ids, group=group)
    best, best_ids = merge_topk(torch.cat(all_s, 1), torch.cat(all_i, 1), k, index.metric)
    return best.to(index.device), best_ids.to(index.device)
