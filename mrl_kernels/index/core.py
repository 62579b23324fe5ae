"""MatryoshkaIndex: storage and search.

Storage
-------
``storage="device"``: the [N, D] vectors live on ``device``; every stage runs on them directly.

``storage="host"`` (for databases larger than GPU memory): the full vectors stay in host memory (or in
a read-only memory map, see :meth:`MatryoshkaIndex.load` with ``mmap=True``). A contiguous copy of the
first ``prefix_dim`` dims ([N, prefix_dim], small) is kept on ``device``:

- shortlist stages (and exact searches at ``dim <= prefix_dim``) run on the device prefix;
- re-rank stages gather only the candidate rows: the unique candidate ids of a query batch are
  ``index_select``-ed from the host tensor, at the stage's dim only, copied to ``device`` and re-scored
  there (stages at ``dim <= prefix_dim`` re-rank on the device prefix and move nothing);
- an exact :meth:`search` at ``dim > prefix_dim`` streams the host rows to the device in chunks of
  ``scan_rows`` rows and merges the per-chunk top-k (exact, one pass over the host data).

``prefix_dim=None`` means 64 (capped at D) and grows automatically to the largest shortlist dim
used by :meth:`adaptive_search` / :meth:`funnel_search` (rebuilding the device prefix once); an explicit
``prefix_dim`` is never changed (a shortlist stage past it is then a streamed scan).
Both storages give the same results (the same rows are scored by the same ops).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..ops import search as search_ops
from ..ops._validation import check_int
from ..ops.search_torch import merge_topk
from . import fileformat
from .fileformat import DTYPE_NAMES
from .sharding import sharded_search

_STORAGES = ("device", "host")
# The host-storage device prefix when prefix_dim=None: the paper's shortlist dims are 8 to 64, so 64 dims
# serve them all while costing, in fp16, 128 bytes of device memory per row (1/16 of a 1024-dim vector).
_DEFAULT_PREFIX = 64
_MIN_CAPACITY = 16  # first allocation, in rows: a few tiny adds do not each reallocate
# Rows per chunk of a streamed (host storage) scan: enough that each chunk's prefix_topk call and top-k
# merge cost little next to scoring 65,536 rows (k is at most a few hundred), few enough that the chunk's
# device copy (65,536 x dim x itemsize: 256 MB at dim 2048 in fp16) fits beside the prefix on any GPU.
_SCAN_ROWS = 1 << 16


def _check_device(device) -> torch.device:
    """torch.device(device) (cpu for None), refused here rather than at the first add when it cannot run."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e}); pass 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device={device!r}, but torch cannot use a CUDA GPU here (torch.cuda.is_available() "
                             f"is False; this torch is {build}): pass device='cpu' (or leave device=None)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r} but only {count} CUDA device(s) are visible: pass "
                             f"device='cuda' or 'cuda:i' with i < {count}")
    return dev


def _as_float_tensor(x, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


class MatryoshkaIndex:
    """A flat (exact) index of Matryoshka embeddings; see :mod:`mrl_kernels.index.core` for the storage and
    :mod:`mrl_kernels.index.fileformat` for the file format.

    metric: "cosine" (the default, as in every search op: each prefix re-normalised, since a prefix of an
    MRL embedding is not unit-norm even where the full vector is, and an inner product on a prefix would
    rank rows partly by their prefix norms), "ip" or "l2" (squared distance, smaller is better).
    dtype: the storage dtype (float32, float16 or bfloat16); vectors and queries are cast to it.
    device: where searches run (default: cpu); refused at once if torch cannot use it. storage: "device"
    (everything on ``device``) or "host" (full vectors in host memory, a [N, prefix_dim] prefix on
    ``device``). prefix_dim: see :mod:`mrl_kernels.index.core`.
    """

    def __init__(self, metric: str = "cosine", dtype: torch.dtype = torch.float16, device=None,
                 prefix_dim: int | None = None, storage: str = "device"):
        if metric not in search_ops.METRICS:
            raise ValueError(f"metric must be one of {list(search_ops.METRICS)}, got {metric!r}")
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype must be one of (float32, float16, bfloat16), got {dtype}")
        if storage not in _STORAGES:
            raise ValueError(f"storage must be one of {list(_STORAGES)}, got {storage!r}")
        self.metric = metric
        self.dtype = dtype
        self.device = _check_device(device)
        self.storage = storage
        self._prefix_auto = prefix_dim is None
        self._prefix_dim = None if prefix_dim is None else check_int(prefix_dim, "prefix_dim", 1)
        self._d: int | None = None
        self._n = 0
        self._data: Tensor | None = None      # [capacity, D]: on device, or host (cpu / memory map)
        self._prefix: Tensor | None = None    # storage="host": [capacity, prefix_dim] on device
        self._mmap = False
        self._path: str | None = None
        self._sha256: str | None = None       # checksum of the file the vectors came from
        self.scan_rows = _SCAN_ROWS            # rows per chunk of a streamed (host) scan

    # -- properties ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def dim(self) -> int | None:
        """D, fixed by the first add (None before)."""
        return self._d

    @property
    def prefix_dim(self) -> int | None:
        """Dims of the device prefix (storage="host"); the resolved default once D is known."""
        if self._prefix_dim is not None:
            return self._prefix_dim if self._d is None else min(self._prefix_dim, self._d)
        return None if self._d is None else min(_DEFAULT_PREFIX, self._d)

    @property
    def capacity(self) -> int:
        return 0 if self._data is None else self._data.shape[0]

    @property
    def vectors(self) -> Tensor:
        """The stored [N, D] vectors (a view; do not modify). Host or memory-mapped for storage="host"."""
        if self._data is None:
            return torch.empty(0, 0, dtype=self.dtype, device=self._home)
        return self._data[: self._n]

    @property
    def _home(self) -> torch.device:
        return self.device if self.storage == "device" else torch.device("cpu")

    def __repr__(self) -> str:
        return (f"MatryoshkaIndex(n={self._n}, d={self._d}, metric={self.metric!r}, "
                f"dtype={DTYPE_NAMES[self.dtype]}, device={str(self.device)!r}, storage={self.storage!r}, "
                f"prefix_dim={self.prefix_dim}{', mmap' if self._mmap else ''})")

    # -- adding ----------------------------------------------------------------------------------

    def add(self, vectors) -> None:
        """Append [n, D] vectors (tensor or numpy array); their ids are len(self) ... len(self) + n - 1."""
        if self._mmap:
            raise ValueError(f"this index is memory-mapped read-only from {self._path!r}; "
                             "load it with mmap=False to add vectors")
        x = _as_float_tensor(vectors, "vectors")
        if self._d is not None and x.shape[1] != self._d:
            raise ValueError(f"vectors must have {self._d} dims like the index, got shape {tuple(x.shape)}")
        if self._prefix_dim is not None and x.shape[1] < self._prefix_dim and self._d is None:
            raise ValueError(f"prefix_dim={self._prefix_dim} exceeds the vectors' dim {x.shape[1]}")
        x = self._cast_finite(x, "vectors", self._home)
        if self._d is None:
            self._d = x.shape[1]
        n_new = self._n + x.shape[0]
        self._reserve(n_new)
        self._data[self._n:n_new] = x
        if self._prefix is not None:
            self._prefix[self._n:n_new] = x[:, : self._prefix.shape[1]].to(self.device)
        self._n = n_new
        self._sha256 = None  # no longer the file's contents

    def _reserve(self, needed: int) -> None:
        """Capacity doubling: amortised O(1) copies per added row."""
        cap = self.capacity
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, _MIN_CAPACITY)
        data = torch.empty(new_cap, self._d, dtype=self.dtype, device=self._home)
        if self._n:
            data[: self._n] = self._data[: self._n]
        self._data = data
        if self.storage == "host":
            p = self.prefix_dim
            prefix = torch.empty(new_cap, p, dtype=self.dtype, device=self.device)
            if self._n:
                prefix[: self._n] = self._prefix[: self._n]
            self._prefix = prefix

    def _build_prefix(self, p: int) -> None:
        """(Re)build the device prefix [capacity, p] from the host vectors, in chunks."""
        prefix = torch.empty(max(self.capacity, self._n), p, dtype=self.dtype, device=self.device)
        for s in range(0, self._n, self.scan_rows):
            e = min(self._n, s + self.scan_rows)
            prefix[s:e] = self._data[s:e, :p].to(self.device)
        self._prefix = prefix

    def _ensure_prefix(self, d: int) -> None:
        if self.storage == "host" and self._prefix_auto and d > self._prefix.shape[1]:
            self._prefix_dim = d
            self._build_prefix(d)

    # -- validation ------------------------------------------------------------------------------

    def _check_ready(self, k) -> int:
        if self._n == 0:
            raise ValueError("the index is empty: add vectors before searching")
        return check_int(k, "k", 1, self._n)

    def check_query_shape(self, queries) -> Tensor:
        """queries as a 2-D float tensor of D dims (D unknown before the first add: any), not yet cast."""
        q = _as_float_tensor(queries, "queries")
        if self._d is not None and q.shape[1] != self._d:
            raise ValueError(f"queries must be [Q, {self._d}] like the index, got shape {tuple(q.shape)}")
        return q

    def search_backend(self, method: str, backend) -> str:
        """The backend the search ops will run for `backend`, refused in the name of the index method."""
        return search_ops.search_backend(f"MatryoshkaIndex.{method}", backend, self.device, self._n)

    def _queries(self, queries) -> Tensor:
        return self._cast_finite(self.check_query_shape(queries), "queries", self.device)

    def _cast_finite(self, x: Tensor, name: str, device) -> Tensor:
        """x in the index dtype on `device`; NaN/Inf, or values the dtype cannot hold, are refused. One
        finiteness pass over the cast values; the original is looked at only to word the error."""
        cast = x.to(device=device, dtype=self.dtype)
        if not bool(torch.isfinite(cast).all()):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or Inf")
            raise ValueError(f"{name} overflow {DTYPE_NAMES[self.dtype]} (values too large for the index dtype)")
        return cast

    def _batched(self, q: Tensor, batch_size, fn) -> tuple[Tensor, Tensor]:
        batch_size = check_int(batch_size, "batch_size", 1)
        out = [fn(q[s:s + batch_size]) for s in range(0, q.shape[0], batch_size)]
        if len(out) == 1:
            return out[0]
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    # -- search ----------------------------------------------------------------------------------

    def search(self, queries, k: int, dim: int | None = None, *, batch_size: int = 4096,
               distributed: bool = False, group=None, backend: str = "auto") -> tuple[Tensor, Tensor]:
        """Exact top-k on the first ``dim`` dims (all D when None): (scores [Q, k], ids [Q, k] int64).

        distributed=True: this index is one shard of a torch.distributed job (the process group must be
        initialised first); see :func:`mrl_kernels.index.sharded_search`.
        """
        if distributed:
            return sharded_search(self, queries, k, dim, group=group, batch_size=batch_size, backend=backend)
        k = self._check_ready(k)
        dim = self._d if dim is None else check_int(dim, "dim", 1, self._d)
        backend = self.search_backend("search", backend)
        q = self._queries(queries)
        return self._batched(q, batch_size, lambda qb: self._topk(qb, k, dim, backend))

    def adaptive_search(self, queries, k: int, shortlist: int = 200, shortlist_dim: int = 16,
                        rerank_dim: int | None = None, *, batch_size: int = 4096,
                        backend: str = "auto") -> tuple[Tensor, Tensor]:
        """The paper's adaptive retrieval: shortlist ``shortlist`` rows at ``shortlist_dim`` dims, re-rank
        them at ``rerank_dim`` (None = D) and keep k. Equals ``funnel_search(q, k, (shortlist_dim,
        rerank_dim), (shortlist,))``; arguments are checked as by :func:`mrl_kernels.adaptive_search`
        (k <= shortlist <= len(self), shortlist_dim <= rerank_dim <= D)."""
        k = self._check_ready(k)
        shortlist, shortlist_dim, rerank_dim = search_ops.check_adaptive(k, shortlist, shortlist_dim, rerank_dim,
                                                                          self._d, self._n)
        return self._funnel(queries, k, (shortlist_dim, rerank_dim), (shortlist,), batch_size, backend,
                            "adaptive_search")

    def funnel_search(self, queries, k: int, dims: Sequence[int], shortlists: Sequence[int], *,
                      batch_size: int = 4096, backend: str = "auto") -> tuple[Tensor, Tensor]:
        """The paper's funnel: shortlist shortlists[0] rows at dims[0], then re-rank at each next dim
        keeping the next shortlist size, and k at dims[-1]. len(dims) == len(shortlists) + 1; arguments are
        checked as by :func:`mrl_kernels.funnel_search`."""
        k = self._check_ready(k)
        dims, shortlists = search_ops.check_funnel(k, dims, shortlists, self._d, self._n)
        return self._funnel(queries, k, dims, shortlists, batch_size, backend, "funnel_search")

    def _funnel(self, queries, k, dims, shortlists, batch_size, backend, method):
        backend = self.search_backend(method, backend)
        q = self._queries(queries)
        self._ensure_prefix(dims[0])
        if self.storage == "device":  # the op runs the whole funnel on the stored vectors
            data = self._data[: self._n]
            return self._batched(q, batch_size, lambda qb: search_ops.funnel_search(
                qb, data, k, dims, shortlists, metric=self.metric, backend=backend))
        # host storage: the same stages, on the device prefix / gathered candidate rows
        return self._batched(q, batch_size, lambda qb: search_ops.run_funnel(
            lambda s, d: self._topk(qb, s, d, backend), lambda ids, s, d: self._rerank(qb, ids, s, d, backend),
            k, dims, shortlists))

    # -- stages (storage-aware; backend already resolved) -------------------------------------------

    def _topk(self, q: Tensor, k: int, dim: int, backend: str) -> tuple[Tensor, Tensor]:
        prefix_topk = search_ops.prefix_topk
        if self.storage == "device":
            return prefix_topk(q, self._data[: self._n], k, dim=dim, metric=self.metric, backend=backend)
        if dim <= self._prefix.shape[1]:
            return prefix_topk(q[:, : self._prefix.shape[1]], self._prefix[: self._n], k, dim=dim,
                               metric=self.metric, backend=backend)
        # Streamed scan of the host rows at `dim` dims, merging each chunk's top-k.
        qd = q[:, :dim].contiguous()
        all_s, all_i = [], []
        for s in range(0, self._n, self.scan_rows):
            e = min(self._n, s + self.scan_rows)
            chunk = self._data[s:e, :dim].to(self.device).contiguous()
            cs, ci = prefix_topk(qd, chunk, min(k, e - s), metric=self.metric, backend=backend)
            all_s.append(cs)
            all_i.append(ci + s)
        if len(all_s) == 1:
            return all_s[0], all_i[0]
        return merge_topk(torch.cat(all_s, 1), torch.cat(all_i, 1), k, self.metric)

    def _rerank(self, q: Tensor, ids: Tensor, k: int, dim: int, backend: str) -> tuple[Tensor, Tensor]:
        rerank = search_ops.rerank  # storage="host" only (device storage runs the funnel op)
        if dim <= self._prefix.shape[1]:
            return rerank(q[:, : self._prefix.shape[1]], self._prefix[: self._n], ids, k, dim=dim,
                          metric=self.metric, backend=backend)
        # Gather only the candidate rows (each unique id once, at `dim` dims) from the host: one copy per stage.
        # torch.unique sorts, so local positions order like the ids and ties still go to the smallest id.
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = self._data[:, :dim].index_select(0, uniq.to(self._data.device)).to(self.device)
        local = inverse.reshape(ids.shape).to(self.device)
        scores, pos = rerank(q[:, :dim].contiguous(), rows, local, k, metric=self.metric, backend=backend)
        return scores, uniq.to(self.device)[pos]

    # -- persistence (format: mrl_kernels.index.fileformat) ----------------------------------------

    def save(self, path) -> None:
        """Write the index to one file (see :mod:`mrl_kernels.index.fileformat`); atomic (temp file +
        rename). The folder must exist (FileNotFoundError naming it otherwise)."""
        path = os.fspath(path)
        if self._n == 0:
            raise ValueError(f"cannot save an empty index to {path!r}")
        fileformat.save(path, self._data[: self._n], self.metric, None if self._prefix_auto else self._prefix_dim)

    @staticmethod
    def read_header(path) -> dict:
        """Check the magic, version and size of an index file and return its JSON header."""
        return fileformat.read_header(os.fspath(path))

    @classmethod
    def load(cls, path, device=None, mmap: bool = False, storage: str | None = None,
             verify: bool | None = None) -> "MatryoshkaIndex":
        """Read an index written by :meth:`save`.

        mmap=False: the payload is read into memory and its SHA-256 checked; storage defaults to
        "device". mmap=True: the payload is mapped read-only (numpy.memmap, wrapped by torch.from_numpy
        without a copy) and used as the host storage (storage must be "host", the default); only the
        file size is checked unless verify=True (or call :meth:`verify` later). A mapped index is
        read-only (add raises). device: as for the constructor, refused before the file is read.
        """
        path = os.fspath(path)
        _check_device(device)
        h = fileformat.read_header(path)
        storage = storage or ("host" if mmap else "device")
        if mmap and storage != "host":
            raise ValueError(f"mmap=True keeps the vectors in the memory map of {path!r}: storage must be "
                             f"'host', got {storage!r}")
        verify = (not mmap) if verify is None else bool(verify)
        data = fileformat.read_payload(path, h, mmap, verify)
        index = cls(metric=h["metric"], dtype=data.dtype, device=device, prefix_dim=h["prefix_dim"], storage=storage)
        index._d, index._n = data.shape[1], data.shape[0]
        index._data = data if storage == "host" else data.to(index.device)
        index._mmap = mmap
        index._path = path
        index._sha256 = h["payload_sha256"]
        if storage == "host":
            index._build_prefix(index.prefix_dim)
        return index

    def verify(self) -> None:
        """Check the stored vectors against the SHA-256 of the file they were loaded from (ValueError on a
        mismatch). Reads every byte: for a memory-mapped index this is the lazy checksum."""
        if self._sha256 is None:
            raise ValueError("nothing to verify against: the index was not loaded from a file, or was "
                             "modified since")
        fileformat.check_payload(self._path, self._data[: self._n], self._sha256)
