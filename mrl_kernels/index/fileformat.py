"""The MatryoshkaIndex file format (version 1), written by MatryoshkaIndex.save and read by load.

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
SHA-256 of the payload bytes). :func:`read_header` refuses, with a ValueError naming the path and the
problem, a wrong magic or version, an unreadable header and a file whose size is not exactly
``payload_offset + payload_nbytes`` (truncated or trailing bytes); :func:`read_payload` and
:func:`check_payload` refuse a payload whose checksum differs. ``load(mmap=False)`` always verifies the
checksum (the payload is read anyway); ``mmap=True`` checks the size only (hashing would read the whole
file, defeating the map): pass ``verify=True`` or call :meth:`MatryoshkaIndex.verify` to check it.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ..ops.search import METRICS

MAGIC = b"\x93MRLIDX\n"
FORMAT_VERSION = 1
FORMAT_NAME = "mrl-kernels.MatryoshkaIndex"
_PREAMBLE = 16  # magic, version, header length
_ALIGN = 64     # payload alignment: a cache line, and a multiple of every dtype's size, for an aligned map
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Same-width integer views: numpy has no bfloat16, so payload bytes travel as raw integer patterns.
_INT_VIEW = {torch.float32: (torch.int32, np.dtype("<i4")), torch.float16: (torch.int16, np.dtype("<i2")),
             torch.bfloat16: (torch.int16, np.dtype("<i2"))}
# Bytes written or hashed per step by save / verify: each step copies its rows to a contiguous host buffer
# (from the GPU, or from a strided view), so the chunk bounds that extra memory; 64 MB makes the per-step
# Python and system-call cost negligible next to hashing 64 MB, and is small next to any host's memory.
PAYLOAD_CHUNK_BYTES = 64 << 20


def _payload_chunks(data: Tensor) -> Iterator[memoryview]:
    """The payload bytes of [n, d] vectors (any device), little-endian, PAYLOAD_CHUNK_BYTES at a time."""
    int_torch, _ = _INT_VIEW[data.dtype]
    rows = max(1, PAYLOAD_CHUNK_BYTES // (data.shape[1] * data.element_size()))
    for s in range(0, data.shape[0], rows):
        chunk = data[s:s + rows].cpu().contiguous().view(int_torch).numpy()
        if sys.byteorder != "little":
            chunk = chunk.byteswap()
        yield memoryview(np.ascontiguousarray(chunk)).cast("B")


def save(path: str, data: Tensor, metric: str, prefix_dim: int | None) -> None:
    """Write [n, d] vectors and the index settings to `path` (atomic: a temporary file, then a rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save the index to {path!r}: the folder {folder!r} does not exist "
                                "(create it first, e.g. os.makedirs(folder, exist_ok=True))")
    n, d = data.shape
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "metric": metric,
              "dtype": DTYPE_NAMES[data.dtype], "n": n, "d": d, "prefix_dim": prefix_dim, "byte_order": "little",
              "payload_offset": 0, "payload_nbytes": n * d * data.element_size(), "payload_sha256": "0" * 64}
    # The header's length does not depend on the offset/checksum values once they are fixed-width.
    raw = json.dumps(header).encode()
    offset = -(-(_PREAMBLE + len(raw) + 32) // _ALIGN) * _ALIGN  # room for the offset's digits
    header["payload_offset"] = offset
    sha = hashlib.sha256()
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * offset)
            for buf in _payload_chunks(data):
                sha.update(buf)
                f.write(buf)
            header["payload_sha256"] = sha.hexdigest()
            raw = json.dumps(header, sort_keys=True).encode()
            assert _PREAMBLE + len(raw) <= offset
            f.seek(0)
            f.write(MAGIC + struct.pack("<II", FORMAT_VERSION, len(raw)) + raw)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_header(path: str) -> dict:
    """Check the magic, version and size of an index file and return its JSON header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pre = f.read(_PREAMBLE)
        if len(pre) < 8 or pre[:8] != MAGIC:
            raise ValueError(f"{path!r} is not a MatryoshkaIndex file (bad magic {pre[:8]!r}, "
                             f"expected {MAGIC!r})")
        if len(pre) < _PREAMBLE:
            raise ValueError(f"{path!r} is truncated: the preamble is {len(pre)} of {_PREAMBLE} bytes")
        version, hlen = struct.unpack("<II", pre[8:_PREAMBLE])
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
    if h["format"] != FORMAT_NAME or h["metric"] not in METRICS or h["dtype"] not in DTYPES \
            or h["byte_order"] != "little":
        raise ValueError(f"{path!r} has a corrupt header: format={h['format']!r}, metric={h['metric']!r}, "
                         f"dtype={h['dtype']!r}, byte_order={h['byte_order']!r}")
    itemsize = torch.empty(0, dtype=DTYPES[h["dtype"]]).element_size()
    if h["payload_nbytes"] != h["n"] * h["d"] * itemsize or h["payload_offset"] < _PREAMBLE + hlen:
        raise ValueError(f"{path!r} has a corrupt header: payload_nbytes={h['payload_nbytes']} for "
                         f"n={h['n']}, d={h['d']}, dtype={h['dtype']} at offset {h['payload_offset']}")
    expected = h["payload_offset"] + h["payload_nbytes"]
    if size < expected:
        raise ValueError(f"{path!r} is truncated: {size} bytes, the header says {expected}")
    if size > expected:
        raise ValueError(f"{path!r} has {size - expected} unexpected trailing bytes "
                         f"({size} bytes, the header says {expected})")
    return h


def _mismatch(path: str, got: str, want: str) -> ValueError:
    return ValueError(f"{path!r} has a corrupted payload: SHA-256 {got} does not match the header's {want}")


def read_payload(path: str, header: dict, mmap: bool, verify: bool) -> Tensor:
    """The [n, d] vectors of a checked file (header from read_header): read into memory, or mapped
    read-only (numpy.memmap wrapped by torch.from_numpy, no copy) when mmap; checked against the header's
    SHA-256 when verify."""
    dtype = DTYPES[header["dtype"]]
    _, int_np = _INT_VIEW[dtype]
    n, d = header["n"], header["d"]
    if mmap:
        arr = np.memmap(path, dtype=int_np, mode="r", offset=header["payload_offset"], shape=(n, d))
    else:
        arr = np.fromfile(path, dtype=int_np, count=n * d, offset=header["payload_offset"]).reshape(n, d)
    if verify:
        got = hashlib.sha256(memoryview(arr).cast("B")).hexdigest()
        if got != header["payload_sha256"]:
            raise _mismatch(path, got, header["payload_sha256"])
    with warnings.catch_warnings():  # a read-only map: torch warns that the tensor is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).view(dtype)


def check_payload(path: str, data: Tensor, sha256: str) -> None:
    """ValueError unless the payload bytes of `data` hash to `sha256` (the checksum of the file at `path`)."""
    sha = hashlib.sha256()
    for buf in _payload_chunks(data):
        sha.update(buf)
    if sha.hexdigest() != sha256:
        raise _mismatch(path, sha.hexdigest(), sha256)
