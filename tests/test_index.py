"""MatryoshkaIndex: search equals float64 brute force, both storages agree, the file format round-trips
and refuses damaged files, bad inputs are rejected with clear messages, and sharded search over 2 gloo
processes equals one search over the concatenated shards."""
import os
import struct

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrl_kernels import reference
from mrl_kernels.index import MAGIC, MatryoshkaIndex, sharded_search

D = 40
METRICS = ("ip", "cosine", "l2")


def data(n=300, q=9, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(q, d, generator=g)


def build(x, chunks=(70, 70, 1, 159), **kwargs):
    index = MatryoshkaIndex(**kwargs)
    for part in x.split(list(chunks)) if sum(chunks) == len(x) else (x,):
        index.add(part)
    return index


def assert_near_exact(scores, ids, x, q, k, dim, metric, tol):
    """Each returned id's float64 score equals the returned score and the true k-th best scores (ties
    and rounding near the boundary aside)."""
    true = reference.prefix_scores(q.double(), x.double(), dim, metric)          # [Q, N]
    best, _ = reference.prefix_topk(q.double(), x.double(), k, dim, metric)
    got = true.gather(1, ids)
    torch.testing.assert_close(got, best, atol=tol, rtol=tol)
    torch.testing.assert_close(scores.double(), got, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# Search correctness
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", [None, 7])
def test_search_fp32_equals_float64_brute_force(metric, dim):
    x, q = data()
    index = build(x, metric=metric, dtype=torch.float32)
    scores, ids = index.search(q, 10, dim=dim)
    ref_s, ref_i = reference.prefix_topk(q.double(), x.double(), 10, dim, metric)
    assert ids.dtype == torch.int64 and ids.shape == (9, 10) and scores.shape == (9, 10)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_search_half_storage(metric, dtype):
    x, q = data()
    index = build(x, metric=metric, dtype=dtype)
    xs, qs = x.to(dtype), q.to(dtype)  # what the index holds and searches with
    assert torch.equal(index.vectors, xs)
    scores, ids = index.search(q, 8, dim=16)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    assert_near_exact(scores, ids, xs, qs, 8, 16, metric, tol * (16 if metric != "cosine" else 1))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("storage", ["device", "host"])
def test_adaptive_and_funnel_equal_reference(metric, storage):
    x, q = data(seed=1)
    index = build(x, metric=metric, dtype=torch.float32, storage=storage, prefix_dim=12)
    xd, qd = x.double(), q.double()
    s, i = index.adaptive_search(q, 5, shortlist=40, shortlist_dim=8)
    rs, ri = reference.adaptive_search(qd, xd, 5, 40, 8, None, metric)
    assert torch.equal(i, ri)
    torch.testing.assert_close(s.double(), rs, atol=1e-5, rtol=1e-5)
    dims, shortlists = (4, 8, 16, 32, D), (120, 60, 30, 15)
    s, i = index.funnel_search(q, 5, dims, shortlists)
    rs, ri = reference.funnel_search(qd, xd, 5, dims, shortlists, metric)
    assert torch.equal(i, ri)
    torch.testing.assert_close(s.double(), rs, atol=1e-5, rtol=1e-5)


def test_growth_over_several_adds_is_amortised():
    x, _ = data(n=1000)
    index = MatryoshkaIndex(metric="ip", dtype=torch.float32)
    assert len(index) == 0 and index.dim is None and index.ntotal == 0
    caps = set()
    for part in x.split(7):
        index.add(part)
        caps.add(index.capacity)
        assert index.capacity < 2 * len(index) + 16
    assert len(caps) <= 8  # doubling: a handful of reallocations, not one per add
    assert len(index) == index.ntotal == 1000 and index.dim == D
    assert torch.equal(index.vectors, x)
    # numpy input works and continues the ids
    index.add(np.ones((2, D), dtype=np.float64))
    assert len(index) == 1002 and torch.equal(index.vectors[-1], torch.ones(D))
    s, i = index.search(torch.ones(1, D), 2)
    assert set(i[0].tolist()) == {1000, 1001}


@pytest.mark.parametrize("metric", METRICS)
def test_host_and_device_storage_identical(metric):
    x, q = data(n=500, seed=2)
    dev = build(x, chunks=(500,), metric=metric, dtype=torch.float32)
    host = MatryoshkaIndex(metric=metric, dtype=torch.float32, storage="host", prefix_dim=16)
    host.scan_rows = 64  # several chunks: the streamed scan merges per-chunk top-k
    for part in x.split(123):
        host.add(part)
    assert host._prefix.shape[1] == 16 and torch.equal(host._prefix[:500], x[:, :16])
    for dim in (8, 16, 17, None):  # inside and past the device prefix
        a, b = dev.search(q, 7, dim=dim), host.search(q, 7, dim=dim)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    for args in [dict(shortlist=50, shortlist_dim=8), dict(shortlist=50, shortlist_dim=32, rerank_dim=36)]:
        a, b = dev.adaptive_search(q, 7, **args), host.adaptive_search(q, 7, **args)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    dims, shortlists = (8, 12, 24, D), (100, 50, 20)
    a, b = dev.funnel_search(q, 7, dims, shortlists), host.funnel_search(q, 7, dims, shortlists)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)


def test_auto_prefix_grows_to_the_shortlist_dim_and_batches_agree():
    x, q = data(n=200, seed=3)
    host = build(x, chunks=(200,), metric="cosine", dtype=torch.float32, storage="host")
    assert host.prefix_dim == D  # default 64 capped at D
    small = build(torch.cat([x, x], 1)[:, :80], chunks=(200,), metric="cosine", dtype=torch.float32,
                  storage="host")
    assert small.prefix_dim == 64
    q80 = torch.cat([q, q], 1)[:, :80]
    small.adaptive_search(q80, 3, shortlist=20, shortlist_dim=72)
    assert small.prefix_dim == 72 and small._prefix.shape[1] == 72
    fixed = build(torch.cat([x, x], 1)[:, :80], chunks=(200,), metric="cosine", dtype=torch.float32,
                  storage="host", prefix_dim=8)
    a = fixed.adaptive_search(q80, 3, shortlist=20, shortlist_dim=72)  # streamed first stage
    assert fixed.prefix_dim == 8
    b = small.adaptive_search(q80, 3, shortlist=20, shortlist_dim=72)
    assert torch.equal(a[1], b[1])
    whole = host.search(q, 6, batch_size=4096)
    for bs in (1, 4):
        part = host.search(q, 6, batch_size=bs)
        assert torch.equal(whole[1], part[1])
        torch.testing.assert_close(whole[0], part[0], atol=1e-6, rtol=1e-6)  # BLAS blocking may differ
        part = host.funnel_search(q, 6, (8, D), (30,), batch_size=bs)
        assert torch.equal(part[1], host.funnel_search(q, 6, (8, D), (30,))[1])


def test_queries_are_cast_to_the_index_dtype():
    x, q = data(n=100)
    index = build(x, chunks=(100,), metric="ip", dtype=torch.float16)
    a = index.search(q.double(), 4)
    b = index.search(q.half(), 4)
    c = index.search(q.numpy(), 4)
    assert torch.equal(a[1], b[1]) and torch.equal(a[1], c[1]) and torch.equal(a[0], b[0])


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="metric must be one of"):
        MatryoshkaIndex(metric="dot")
    with pytest.raises(TypeError, match="dtype must be one of"):
        MatryoshkaIndex(dtype=torch.float64)
    with pytest.raises(ValueError, match="storage must be one of"):
        MatryoshkaIndex(storage="disk")
    with pytest.raises(ValueError, match="prefix_dim must be >= 1"):
        MatryoshkaIndex(prefix_dim=0)

    index = MatryoshkaIndex(metric="ip", dtype=torch.float32)
    with pytest.raises(ValueError, match="index is empty"):
        index.search(torch.randn(2, D), 1)
    with pytest.raises(ValueError, match="index is empty"):
        index.adaptive_search(torch.randn(2, D), 1)
    with pytest.raises(ValueError, match="vectors is empty"):
        index.add(torch.empty(0, D))
    with pytest.raises(ValueError, match="vectors must be 2-D"):
        index.add(torch.randn(D))
    with pytest.raises(TypeError, match="vectors must have a floating-point dtype"):
        index.add(torch.ones(3, D, dtype=torch.int64))
    with pytest.raises(TypeError, match="vectors must be a torch.Tensor or numpy array"):
        index.add([[1.0] * D])
    with pytest.raises(ValueError, match="vectors contains NaN or Inf"):
        index.add(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="vectors contains NaN or Inf"):
        index.add(torch.tensor([[1.0, float("inf")]]))
    assert len(index) == 0 and index.dim is None  # nothing was added by the failed calls
    with pytest.raises(ValueError, match="prefix_dim=50 exceeds the vectors' dim 40"):
        MatryoshkaIndex(prefix_dim=50).add(torch.randn(3, D))
    with pytest.raises(ValueError, match="overflow float16"):
        MatryoshkaIndex(dtype=torch.float16).add(torch.full((2, D), 1e6))

    x, q = data(n=30)
    index.add(x)
    with pytest.raises(ValueError, match=f"vectors must have {D} dims like the index, got shape \\(2, 39\\)"):
        index.add(torch.randn(2, D - 1))
    with pytest.raises(ValueError, match="k must be in \\[1, 30\\], got 31"):
        index.search(q, 31)
    with pytest.raises(ValueError, match="k must be in \\[1, 30\\], got 0"):
        index.search(q, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        index.search(q, 2.0)
    with pytest.raises(ValueError, match=f"dim must be in \\[1, {D}\\], got {D + 1}"):
        index.search(q, 3, dim=D + 1)
    with pytest.raises(ValueError, match="queries is empty"):
        index.search(torch.empty(0, D), 3)
    with pytest.raises(ValueError, match=f"queries must be \\[Q, {D}\\] like the index"):
        index.search(torch.randn(2, D + 1), 3)
    with pytest.raises(ValueError, match="queries must be 2-D"):
        index.search(torch.randn(D), 3)
    with pytest.raises(ValueError, match="queries contains NaN or Inf"):
        index.search(torch.full((1, D), float("nan")), 3)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        index.search(q, 3, batch_size=0)
    with pytest.raises(ValueError, match="shortlist must be in \\[1, 30\\], got 31"):
        index.adaptive_search(q, 3, shortlist=31)
    with pytest.raises(ValueError, match="k=5 exceeds the previous shortlist shortlist=4"):
        index.adaptive_search(q, 5, shortlist=4)
    with pytest.raises(ValueError, match=f"shortlist_dim must be in \\[1, {D}\\]"):
        index.adaptive_search(q, 3, shortlist=10, shortlist_dim=D + 1)
    with pytest.raises(ValueError, match="rerank_dim=4 is below shortlist_dim=16"):
        index.adaptive_search(q, 3, shortlist=10, rerank_dim=4)
    with pytest.raises(ValueError, match="dims must have one more entry than shortlists"):
        index.funnel_search(q, 3, (8, 16), (10, 5))
    with pytest.raises(ValueError, match="shortlists\\[1\\]=20 exceeds the previous shortlist"):
        index.funnel_search(q, 3, (8, 16, 32), (10, 20))
    with pytest.raises(ValueError, match="dims\\[1\\]=4 is below dims\\[0\\]=8"):
        index.funnel_search(q, 3, (8, 4), (10,))
    with pytest.raises(TypeError, match="dims must be a sequence"):
        index.funnel_search(q, 3, "ab", (10,))
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        index.search(q, 3, distributed=True)


# ----------------------------------------------------------------------------------------------
# Sharding over torch.distributed (gloo, 2 CPU processes)
# ----------------------------------------------------------------------------------------------

SHARDS = (37, 50)


def _shard_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, q = data(n=sum(SHARDS), seed=5)
        start = sum(SHARDS[:rank])
        results = {}
        for metric in METRICS:
            index = MatryoshkaIndex(metric=metric, dtype=torch.float32,
                                    storage="host" if rank else "device", prefix_dim=8)
            index.add(x[start:start + SHARDS[rank]])
            results[metric] = index.search(q, 45, dim=24, distributed=True)  # k > the smaller shard
            results[metric + "_full"] = sharded_search(index, q, 3)
        empty = MatryoshkaIndex(metric="ip", dtype=torch.float32)
        if rank == 0:  # one empty shard: the other rank supplies every candidate
            results["empty"] = sharded_search(empty, q, 4)
        else:
            index = MatryoshkaIndex(metric="ip", dtype=torch.float32)
            index.add(x[:SHARDS[1]])
            results["empty"] = sharded_search(index, q, 4)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_search_two_gloo_processes(tmp_path):
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    x, q = data(n=sum(SHARDS), seed=5)
    for metric in METRICS:
        whole = MatryoshkaIndex(metric=metric, dtype=torch.float32)
        whole.add(x)
        for key, (k, dim) in ((metric, (45, 24)), (metric + "_full", (3, None))):
            es, ei = whole.search(q, k, dim=dim)
            for r in (r0, r1):  # every rank gets the merged global result
                assert torch.equal(r[key][1], ei), key
                torch.testing.assert_close(r[key][0], es.float())
    whole = MatryoshkaIndex(metric="ip", dtype=torch.float32)
    whole.add(x[:SHARDS[1]])
    es, ei = whole.search(q, 4)
    assert torch.equal(r0["empty"][1], ei) and torch.equal(r1["empty"][1], ei)
