"""MatryoshkaIndex: a flat index of Matryoshka embeddings searched at truncated dims.

The index stores each full vector once ([N, D] in ``dtype``: float32, float16 or bfloat16) and answers
exact top-k queries at any prefix dim, the paper's adaptive retrieval (shortlist at a short prefix,
re-rank at a longer one) and its funnel (several re-ranking stages). All scoring is done by the search
ops in :mod:`mrl_kernels.ops.search`; this package adds storage, batching, persistence and sharding.
Results are ``(scores [Q, k] , ids [Q, k] int64)``, best first (descending for "ip"/"cosine",
ascending squared distances for "l2"); ids are insertion order (0, 1, ...).

- :mod:`.core`: :class:`MatryoshkaIndex`, its storage (device or host) and its searches;
- :mod:`.fileformat`: the single-file format of :meth:`MatryoshkaIndex.save` / :meth:`~MatryoshkaIndex.load`;
- :mod:`.sharding`: :func:`sharded_search`, one shard per torch.distributed rank.
"""
from .core import MatryoshkaIndex
from .fileformat import FORMAT_VERSION, MAGIC
from .sharding import sharded_search

__all__ = ["MatryoshkaIndex", "sharded_search", "FORMAT_VERSION", "MAGIC"]
