"""MatryoshkaIndex's file format: save / load round-trips for every dtype and storage, memory maps are
zero-copy, read-only and verified lazily, damaged files are refused naming the path."""
import os
import struct

import pytest
import torch

from mrl_kernels.index import MAGIC, MatryoshkaIndex
from test_index_search import D, build, data


def bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("storage", ["device", "host"])
def test_save_load_round_trip(tmp_path, dtype, storage):
    x, q = data(n=150, seed=4)
    index = build(x, chunks=(150,), metric="l2", dtype=dtype, storage=storage, prefix_dim=8)
    path = tmp_path / "index.mrl"
    index.save(path)
    with open(path, "rb") as f:
        assert f.read(8) == MAGIC
    header = MatryoshkaIndex.read_header(path)
    assert header["n"] == 150 and header["d"] == D and header["metric"] == "l2" and header["prefix_dim"] == 8
    assert header["payload_offset"] % 64 == 0 and header["byte_order"] == "little"
    expected = index.search(q, 5, dim=20), index.adaptive_search(q, 5, shortlist=30, shortlist_dim=6)
    for kwargs in (dict(), dict(storage="host"), dict(mmap=True), dict(mmap=True, verify=True)):
        loaded = MatryoshkaIndex.load(path, **kwargs)
        assert loaded.dtype == dtype and loaded.metric == "l2" and len(loaded) == 150 and loaded.dim == D
        assert loaded.prefix_dim == 8
        assert torch.equal(bits(loaded.vectors), bits(index.vectors))
        got = loaded.search(q, 5, dim=20), loaded.adaptive_search(q, 5, shortlist=30, shortlist_dim=6)
        for (es, ei), (gs, gi) in zip(expected, got):
            assert torch.equal(ei, gi) and torch.equal(es, gs)
        loaded.verify()
    # a loaded (non-mapped) index can grow and be saved again
    loaded = MatryoshkaIndex.load(path)
    loaded.add(x[:3])
    loaded.save(tmp_path / "again.mrl")
    assert torch.equal(bits(MatryoshkaIndex.load(tmp_path / "again.mrl").vectors[150:]), bits(x[:3].to(dtype)))


def test_mmap_is_zero_copy_read_only_and_verifies_lazily(tmp_path):
    x, q = data(n=64)
    path = tmp_path / "m.mrl"
    build(x, chunks=(64,), metric="ip", dtype=torch.float32).save(path)
    loaded = MatryoshkaIndex.load(path, mmap=True)
    assert loaded.storage == "host" and loaded._mmap
    header = MatryoshkaIndex.read_header(path)
    if os.path.exists("/proc/self/maps"):  # no copy: the tensor's memory is a mapping of the file itself
        ptr = loaded.vectors.data_ptr()
        with open("/proc/self/maps") as f:
            regions = [line.split() for line in f]
        hit = [r for r in regions if int(r[0].split("-")[0], 16) <= ptr < int(r[0].split("-")[1], 16)]
        assert hit and hit[0][-1] == str(path), hit
    with pytest.raises(ValueError, match="memory-mapped read-only.*mmap=False"):
        loaded.add(x[:1])
    with pytest.raises(ValueError, match="storage must be 'host'"):
        MatryoshkaIndex.load(path, mmap=True, storage="device")
    # corrupt one payload byte: a mapped load (size check only) accepts it, verify() catches it
    with open(path, "r+b") as f:
        f.seek(header["payload_offset"] + 5)
        byte = f.read(1)
        f.seek(header["payload_offset"] + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    lazy = MatryoshkaIndex.load(path, mmap=True)
    with pytest.raises(ValueError, match="corrupted payload"):
        lazy.verify()
    with pytest.raises(ValueError, match="corrupted payload"):
        MatryoshkaIndex.load(path, mmap=True, verify=True)
    with pytest.raises(ValueError, match="nothing to verify"):
        build(x, chunks=(64,), metric="ip", dtype=torch.float32).verify()


def saved(tmp_path):
    x, _ = data(n=50)
    path = tmp_path / "ok.mrl"
    build(x, chunks=(50,), metric="cosine", dtype=torch.float16).save(path)
    return path, path.read_bytes(), MatryoshkaIndex.read_header(path)


def test_damaged_files_are_refused(tmp_path):
    path, raw, header = saved(tmp_path)
    bad = tmp_path / "bad.mrl"
    off = header["payload_offset"]
    cases = [
        (raw[:-10], "truncated: .* bytes, the header says"),
        (raw[:off], "truncated"),
        (raw[:30], "truncated: the header is"),
        (raw[:12], "truncated: the preamble"),
        (raw + b"x", "unexpected trailing bytes"),
        (b"NOTANIDX" + raw[8:], "not a MatryoshkaIndex file \\(bad magic"),
        (raw[:8] + struct.pack("<I", 99) + raw[12:], "unsupported format version 99"),
        (raw[:16] + b"#" + raw[17:], "corrupt header"),
        (raw[:off + 3] + bytes([raw[off + 3] ^ 1]) + raw[off + 4:], "corrupted payload: SHA-256"),
    ]
    for content, message in cases:
        bad.write_bytes(content)
        for kwargs in (dict(), dict(mmap=True)):
            if "SHA-256" in message and kwargs:
                kwargs = dict(mmap=True, verify=True)
            with pytest.raises(ValueError, match=message) as info:
                MatryoshkaIndex.load(bad, **kwargs)
            assert str(bad) in str(info.value)
    with pytest.raises(ValueError, match="cannot save an empty index"):
        MatryoshkaIndex().save(tmp_path / "empty.mrl")
    assert MatryoshkaIndex.load(path).metric == "cosine"  # the intact file still loads
