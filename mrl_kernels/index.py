"""MatryoshkaIndex: a flat index of Matryoshka embeddings searched at truncated dims.

The index stores each full vector once ([N, D] in ``dtype``: float32, float16 or bfloat16) and answers
exact top-k queries at any prefix dim, the paper's adaptive retrieval (shortlist at a short prefix,
re-rank at a longer one) and its funnel (several re-ranking stages). All scoring is done by the search
ops in :mod:`mrl_kernels.ops.search`; this module adds storage, batching, persistence and sharding.
Results are ``(scores [Q, k] , ids [Q, k] int64)``, best first (descending for "ip"/"cosine",
ascending squared distances for "l2"); ids are insertion order (0, 1, ...).

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

Sharding
--------
``search(..., distributed=True)`` (or :func:`sharded_search`): each torch.distributed rank holds one
shard (its own index) and passes the same queries. Shard sizes are all-gathered, giving each rank the
global id offset of its shard (the sum of the sizes of lower ranks); each rank searches its shard,
the candidates (scores, local ids + offset) are all-gathered and merged into the global top-k, returned
on every rank. The result equals a single search over the concatenated shards (ties aside).

File format (version 1)
-----------------------
A single file, all integers little-endian::

    offset 0   8 bytes   magic b"\\x93MRLIDX\\n"
    offset 8   uint32    format version (1)
    offset 12  uint32    H, the byte length of the JSON header
    offset 16  H bytes   UTF-8 JSON header (below)
               zero padding up to payload_offset (a multiple of 64, so the payload can be mapped aligned)
    payload_offset       the vectors: n * d * itemsize bytes, row-major, little-endian
                         (bfloat16 as its raw 16-bit patterns); nothing follows

The header is an object with ``format`` ("mrl-kernels.MatryoshkaIndex"), ``version``, ``metric``,
``dtype`` ("float32" | "float16" | "bfloat16"), ``n``, ``d``, ``prefix_dim`` (null for the automatic
default), ``byte_order`` ("little"), ``payload_offset``, ``payload_nbytes`` and ``payload_sha256`` (hex
SHA-256 of the payload bytes). :meth:`MatryoshkaIndex.load` refuses, with a ValueError naming the path and
the problem, a wrong magic or version, an unreadable header, a file whose size is not exactly
``payload_offset + payload_nbytes`` (truncated or trailing bytes) and, when it verifies, a payload whose
checksum differs. ``mmap=False`` always verifies the checksum (the payload is read anyway);
``mmap=True`` checks the size only (hashing would read the whole file, defeating the map): pass
``verify=True`` or call :meth:`MatryoshkaIndex.verify` to check it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .ops import search as search_ops
from .ops._validation import check_int

__all__ = ["MatryoshkaIndex", "sharded_search", "FORMAT_VERSION", "MAGIC"]

MAGIC = b"\x93MRLIDX\n"
FORMAT_VERSION = 1
_FORMAT_NAME = "mrl-kernels.MatryoshkaIndex"
_ALIGN = 64
_METRICS = ("ip", "cosine", "l2")
_STORAGES = ("device", "host")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# Same-width integer views: numpy has no bfloat16, so payload bytes travel as raw integer patterns.
_INT_VIEW = {torch.float32: (torch.int32, np.dtype("<i4")), torch.float16: (torch.int16, np.dtype("<i2")),
             torch.bfloat16: (torch.int16, np.dtype("<i2"))}
_DEFAULT_PREFIX = 64
_MIN_CAPACITY = 16


# ----------------------------------------------------------------------------------------------
# The search ops (one indirection, so the index never reimplements scoring)
# ----------------------------------------------------------------------------------------------

def _op(name: str):
    return getattr(search_ops, name)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

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


def _merge(scores: Tensor, ids: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """Best k of concatenated candidates [Q, C] (C >= k)."""
    best, pos = torch.topk(scores, k, dim=1, largest=metric != "l2", sorted=True)
    return best, ids.gather(1, pos)


def _worst(metric: str) -> float:
    return math.inf if metric == "l2" else -math.inf


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------

class MatryoshkaIndex:
    """A flat (exact) index of Matryoshka embeddings; see the module docstring for storage and format.

    metric: "cosine" (each prefix re-normalised), "ip" or "l2" (squared distance, smaller is better).
    dtype: the storage dtype (float32, float16 or bfloat16); vectors and queries are cast to it.
    device: where searches run (default: cpu). storage: "device" (everything on ``device``) or "host"
    (full vectors in host memory, a [N, prefix_dim] prefix on ``device``). prefix_dim: see the module doc.
    """

    def __init__(self, metric: str = "cosine", dtype: torch.dtype = torch.float16, device=None,
                 prefix_dim: int | None = None, storage: str = "device"):
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {list(_METRICS)}, got {metric!r}")
        if dtype not in _DTYPE_NAMES:
            raise TypeError(f"dtype must be one of (float32, float16, bfloat16), got {dtype}")
        if storage not in _STORAGES:
            raise ValueError(f"storage must be one of {list(_STORAGES)}, got {storage!r}")
        self.metric = metric
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
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
        self.scan_rows = 1 << 16               # rows per chunk of a streamed (host) scan

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
                f"dtype={_DTYPE_NAMES[self.dtype]}, device={str(self.device)!r}, storage={self.storage!r}, "
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

    def _queries(self, queries) -> Tensor:
        q = _as_float_tensor(queries, "queries")
        if q.shape[1] != self._d:
            raise ValueError(f"queries must be [Q, {self._d}] like the index, got shape {tuple(q.shape)}")
        return self._cast_finite(q, "queries", self.device)

    def _cast_finite(self, x: Tensor, name: str, device) -> Tensor:
        """x in the index dtype on `device`; NaN/Inf, or values the dtype cannot hold, are refused. One
        finiteness pass over the cast values; the original is looked at only to word the error."""
        cast = x.to(device=device, dtype=self.dtype)
        if not bool(torch.isfinite(cast).all()):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or Inf")
            raise ValueError(f"{name} overflow {_DTYPE_NAMES[self.dtype]} (values too large for the index dtype)")
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

        distributed=True: this index is one shard of a torch.distributed job; see :func:`sharded_search`.
        """
        if distributed:
            return sharded_search(self, queries, k, dim, group=group, batch_size=batch_size, backend=backend)
        k = self._check_ready(k)
        dim = self._d if dim is None else check_int(dim, "dim", 1, self._d)
        q = self._queries(queries)
        return self._batched(q, batch_size, lambda qb: self._topk(qb, k, dim, backend))

    def adaptive_search(self, queries, k: int, shortlist: int = 200, shortlist_dim: int = 16,
                        rerank_dim: int | None = None, *, batch_size: int = 4096,
                        backend: str = "auto") -> tuple[Tensor, Tensor]:
        """The paper's adaptive retrieval: shortlist ``shortlist`` rows at ``shortlist_dim`` dims, re-rank
        them at ``rerank_dim`` (None = D) and keep k. Equals ``funnel_search(q, k, (shortlist_dim,
        rerank_dim), (shortlist,))``."""
        self._check_ready(k)
        rerank_dim = self._d if rerank_dim is None else rerank_dim
        return self._funnel(queries, k, (shortlist_dim, rerank_dim), (shortlist,), batch_size, backend,
                            names=("shortlist_dim", "rerank_dim"), shortlist_names=("shortlist",))

    def funnel_search(self, queries, k: int, dims: Sequence[int], shortlists: Sequence[int], *,
                      batch_size: int = 4096, backend: str = "auto") -> tuple[Tensor, Tensor]:
        """The paper's funnel: shortlist shortlists[0] rows at dims[0], then re-rank at each next dim
        keeping the next shortlist size, and k at dims[-1]. len(dims) == len(shortlists) + 1."""
        return self._funnel(queries, k, dims, shortlists, batch_size, backend)

    def _funnel(self, queries, k, dims, shortlists, batch_size, backend, names=None, shortlist_names=None):
        k = self._check_ready(k)
        for value, name in ((dims, "dims"), (shortlists, "shortlists")):
            if isinstance(value, Tensor):
                value = value.tolist()
            if not isinstance(value, Sequence) or isinstance(value, str):
                raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
        dims, shortlists = list(dims), list(shortlists)
        if len(shortlists) == 0 or len(dims) != len(shortlists) + 1:
            raise ValueError(f"dims must have one more entry than shortlists (>= 1), got dims={dims} "
                             f"and shortlists={shortlists}")
        names = names or [f"dims[{j}]" for j in range(len(dims))]
        shortlist_names = shortlist_names or [f"shortlists[{j}]" for j in range(len(shortlists))]
        dims = [check_int(d, nm, 1, self._d) for d, nm in zip(dims, names)]
        shortlists = [check_int(s, nm, 1, self._n) for s, nm in zip(shortlists, shortlist_names)]
        for j in range(1, len(dims)):
            if dims[j] < dims[j - 1]:
                raise ValueError(f"{names[j]}={dims[j]} is below {names[j - 1]}={dims[j - 1]}: dims must be "
                                 "non-decreasing (each stage re-ranks on at least as many dims)")
        keep = shortlists + [k]
        for j in range(1, len(keep)):
            if keep[j] > keep[j - 1]:
                what = "k" if j == len(keep) - 1 else shortlist_names[j]
                raise ValueError(f"{what}={keep[j]} exceeds the previous shortlist "
                                 f"{shortlist_names[j - 1]}={keep[j - 1]}: shortlists must not grow")
        q = self._queries(queries)
        self._ensure_prefix(dims[0])

        if self.storage == "device":  # the op runs the whole funnel on the stored vectors
            funnel = _op("funnel_search")
            data = self._data[: self._n]
            return self._batched(q, batch_size, lambda qb: funnel(qb, data, k, dims, shortlists,
                                                                  metric=self.metric, backend=backend))

        def run(qb):  # host storage: the same stages, on the device prefix / gathered candidate rows
            scores, ids = self._topk(qb, keep[0], dims[0], backend)
            for d, s in zip(dims[1:], keep[1:]):
                scores, ids = self._rerank(qb, ids, s, d, backend)
            return scores, ids

        return self._batched(q, batch_size, run)

    # -- stages (storage-aware) ------------------------------------------------------------------

    def _topk(self, q: Tensor, k: int, dim: int, backend: str) -> tuple[Tensor, Tensor]:
        prefix_topk = _op("prefix_topk")
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
        return _merge(torch.cat(all_s, 1), torch.cat(all_i, 1), k, self.metric)

    def _rerank(self, q: Tensor, ids: Tensor, k: int, dim: int, backend: str) -> tuple[Tensor, Tensor]:
        rerank = _op("rerank")  # storage="host" only (device storage runs the funnel op)
        if dim <= self._prefix.shape[1]:
            return rerank(q[:, : self._prefix.shape[1]], self._prefix[: self._n], ids, k, dim=dim,
                          metric=self.metric, backend=backend)
        # Gather only the candidate rows (each unique id once, at `dim` dims) from the host.
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = self._data[:, :dim].index_select(0, uniq.to(self._data.device)).to(self.device)
        local = inverse.reshape(ids.shape).to(self.device)
        scores, pos = rerank(q[:, :dim].contiguous(), rows, local, k, metric=self.metric, backend=backend)
        return scores, uniq.to(self.device)[pos]

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the index to one file (format in the module docstring); atomic (temp file + rename)."""
        path = os.fspath(path)
        if self._n == 0:
            raise ValueError(f"cannot save an empty index to {path!r}")
        int_torch, _ = _INT_VIEW[self.dtype]
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        nbytes = self._n * self._d * itemsize
        header = {"format": _FORMAT_NAME, "version": FORMAT_VERSION, "metric": self.metric,
                  "dtype": _DTYPE_NAMES[self.dtype], "n": self._n, "d": self._d,
                  "prefix_dim": None if self._prefix_auto else self._prefix_dim, "byte_order": "little",
                  "payload_offset": 0, "payload_nbytes": nbytes, "payload_sha256": "0" * 64}
        # The header's length does not depend on the offset/checksum values once they are fixed-width.
        raw = json.dumps(header).encode()
        offset = -(-(16 + len(raw) + 32) // _ALIGN) * _ALIGN  # room for the offset's digits
        header["payload_offset"] = offset

        def encode(h):
            b = json.dumps(h, sort_keys=True).encode()
            assert 16 + len(b) <= offset
            return b

        sha = hashlib.sha256()
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(b"\0" * offset)
                rows = max(1, (64 << 20) // (self._d * itemsize))
                for s in range(0, self._n, rows):
                    chunk = self._data[s:min(self._n, s + rows)].cpu().contiguous().view(int_torch).numpy()
                    if sys.byteorder != "little":
                        chunk = chunk.byteswap()
                    buf = memoryview(np.ascontiguousarray(chunk)).cast("B")
                    sha.update(buf)
                    f.write(buf)
                header["payload_sha256"] = sha.hexdigest()
                raw = encode(header)
                f.seek(0)
                f.write(MAGIC + struct.pack("<II", FORMAT_VERSION, len(raw)) + raw)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @staticmethod
    def read_header(path) -> dict:
        """Check the magic, version and size of an index file and return its JSON header."""
        path = os.fspath(path)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            pre = f.read(16)
            if len(pre) < 8 or pre[:8] != MAGIC:
                raise ValueError(f"{path!r} is not a MatryoshkaIndex file (bad magic {pre[:8]!r}, "
                                 f"expected {MAGIC!r})")
            if len(pre) < 16:
                raise ValueError(f"{path!r} is truncated: the preamble is {len(pre)} of 16 bytes")
            version, hlen = struct.unpack("<II", pre[8:16])
            if version != FORMAT_VERSION:
                raise ValueError(f"{path!r} has unsupported format version {version} "
                                 f"(this build reads version {FORMAT_VERSION})")
            raw = f.read(hlen)
        if len(raw) < hlen:
            raise ValueError(f"{path!r} is truncated: the header is {len(raw)} of {hlen} bytes")
        try:
            h = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r} has a corrupt header: {e}") from None
        keys = ("format", "metric", "dtype", "n", "d", "prefix_dim", "byte_order", "payload_offset",
                "payload_nbytes", "payload_sha256")
        missing = [key for key in keys if not isinstance(h, dict) or key not in h]
        if missing:
            raise ValueError(f"{path!r} has a corrupt header: missing {missing}")
        if h["format"] != _FORMAT_NAME or h["metric"] not in _METRICS or h["dtype"] not in _DTYPES \
                or h["byte_order"] != "little":
            raise ValueError(f"{path!r} has a corrupt header: format={h['format']!r}, metric={h['metric']!r}, "
                             f"dtype={h['dtype']!r}, byte_order={h['byte_order']!r}")
        itemsize = torch.empty(0, dtype=_DTYPES[h["dtype"]]).element_size()
        if h["payload_nbytes"] != h["n"] * h["d"] * itemsize or h["payload_offset"] < 16 + hlen:
            raise ValueError(f"{path!r} has a corrupt header: payload_nbytes={h['payload_nbytes']} for "
                             f"n={h['n']}, d={h['d']}, dtype={h['dtype']} at offset {h['payload_offset']}")
        expected = h["payload_offset"] + h["payload_nbytes"]
        if size < expected:
            raise ValueError(f"{path!r} is truncated: {size} bytes, the header says {expected}")
        if size > expected:
            raise ValueError(f"{path!r} has {size - expected} unexpected trailing bytes "
                             f"({size} bytes, the header says {expected})")
        return h

    @classmethod
    def load(cls, path, device=None, mmap: bool = False, storage: str | None = None,
             verify: bool | None = None) -> "MatryoshkaIndex":
        """Read an index written by :meth:`save`.

        mmap=False: the payload is read into memory and its SHA-256 checked; storage defaults to
        "device". mmap=True: the payload is mapped read-only (numpy.memmap, wrapped by torch.from_numpy
        without a copy) and used as the host storage (storage must be "host", the default); only the
        file size is checked unless verify=True (or call :meth:`verify` later). A mapped index is
        read-only (add raises).
        """
        path = os.fspath(path)
        h = cls.read_header(path)
        storage = storage or ("host" if mmap else "device")
        if mmap and storage != "host":
            raise ValueError(f"mmap=True keeps the vectors in the memory map of {path!r}: storage must be "
                             f"'host', got {storage!r}")
        verify = (not mmap) if verify is None else bool(verify)
        dtype = _DTYPES[h["dtype"]]
        int_torch, int_np = _INT_VIEW[dtype]
        n, d = h["n"], h["d"]
        if mmap:
            arr = np.memmap(path, dtype=int_np, mode="r", offset=h["payload_offset"], shape=(n, d))
        else:
            arr = np.fromfile(path, dtype=int_np, count=n * d, offset=h["payload_offset"]).reshape(n, d)
        if verify:
            got = hashlib.sha256(memoryview(arr).cast("B")).hexdigest()
            if got != h["payload_sha256"]:
                raise ValueError(f"{path!r} has a corrupted payload: SHA-256 {got} does not match the "
                                 f"header's {h['payload_sha256']}")
        with warnings.catch_warnings():  # a read-only map: torch warns that the tensor is not writable
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(arr).view(dtype)
        index = cls(metric=h["metric"], dtype=dtype, device=device, prefix_dim=h["prefix_dim"], storage=storage)
        index._d, index._n = d, n
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
        int_torch, _ = _INT_VIEW[self.dtype]
        sha = hashlib.sha256()
        rows = max(1, (64 << 20) // (self._d * self._data.element_size()))
        for s in range(0, self._n, rows):
            chunk = self._data[s:min(self._n, s + rows)].cpu().contiguous().view(int_torch).numpy()
            sha.update(memoryview(chunk).cast("B"))
        if sha.hexdigest() != self._sha256:
            raise ValueError(f"{self._path!r} has a corrupted payload: SHA-256 {sha.hexdigest()} does not "
                             f"match the header's {self._sha256}")


# ----------------------------------------------------------------------------------------------
# Sharding over torch.distributed
# ----------------------------------------------------------------------------------------------

def sharded_search(index: MatryoshkaIndex, queries, k: int, dim: int | None = None, *, group=None,
                   batch_size: int = 4096, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact top-k over the union of every rank's shard; call it on every rank with the same queries.

    Ids are global: a shard's rows are numbered after those of all lower ranks (offset = the sum of
    the all-gathered shard sizes of lower ranks). Each rank searches its shard for min(k, its size)
    candidates (padded to k with the worst score and id -1), the candidates are all-gathered and the
    global top-k is selected; every rank gets the same (scores [Q, k] float32, ids [Q, k] int64) on
    ``index.device``. Communication tensors live on the CPU for gloo and on the current CUDA device for
    nccl. An empty shard is allowed as long as k <= the global size.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed search needs an initialised torch.distributed process group")
    q = _as_float_tensor(queries, "queries")
    if index.dim is not None:  # local checks before any collective (a rank that raised later would hang the rest)
        if q.shape[1] != index.dim:
            raise ValueError(f"queries must be [Q, {index.dim}] like the index, got shape {tuple(q.shape)}")
        if dim is not None:
            check_int(dim, "dim", 1, index.dim)
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
    scores = torch.full((nq, k), _worst(index.metric), dtype=torch.float32, device=comm)
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
    best, best_ids = _merge(torch.cat(all_s, 1), torch.cat(all_i, 1), k, index.metric)
    return best.to(index.device), best_ids.to(index.device)
