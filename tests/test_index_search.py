"""MatryoshkaIndex storage and search: search equals float64 brute force, both storages agree, adds
grow the storage amortised, queries are cast to the index dtype. (File format: test_index_format.py;
sharding: test_index_sharding.py; bad inputs: test_validation.py.) The data helpers here serve those files
too."""
import inspect

import numpy as np
import pytest
import torch

import mrl_kernels as mk
from mrl_kernels import reference
from mrl_kernels.index import MatryoshkaIndex

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


def test_public_names_and_the_package_layout():
    """The package split kept the public names: mk.MatryoshkaIndex and mrl_kernels.index's exports."""
    import mrl_kernels.index as index_pkg

    assert mk.MatryoshkaIndex is MatryoshkaIndex is index_pkg.core.MatryoshkaIndex
    assert set(index_pkg.__all__) == {"MatryoshkaIndex", "sharded_search", "FORMAT_VERSION", "MAGIC"}
    assert index_pkg.sharded_search is index_pkg.sharding.sharded_search
    assert index_pkg.MAGIC is index_pkg.fileformat.MAGIC


def test_metric_defaults_to_cosine_everywhere():
    """One default for one concept: the index and every search op (and the index's default search equals
    the op's default)."""
    for fn in (MatryoshkaIndex, mk.prefix_topk, mk.rerank, mk.funnel_search, mk.adaptive_search):
        assert inspect.signature(fn).parameters["metric"].default == "cosine", fn
    x, q = data(n=120)
    index = build(x, chunks=(120,), dtype=torch.float32)
    got = index.search(q, 6, dim=12)
    want = mk.prefix_topk(q, x, 6, dim=12)
    assert torch.equal(got[1], want[1])
    assert torch.equal(want[1], mk.prefix_topk(q, x, 6, dim=12, metric="cosine")[1])


@pytest.mark.triton
def test_host_storage_funnel_with_the_triton_backend(kernel_device):
    """backend='triton' on a host-storage index: the first stage runs the Triton top-k and the re-ranking
    stages the torch backend (rerank has no Triton kernel), as in mk.funnel_search."""
    from mrl_kernels.ops._backend import triton_interpreter_on

    if kernel_device == "cpu" and not triton_interpreter_on():
        pytest.skip("needs CUDA or the Triton interpreter")
    x, q = data(n=200, seed=6)
    host = build(x, chunks=(200,), metric="l2", dtype=torch.float32, storage="host", prefix_dim=8,
                 device=kernel_device)
    dev = build(x, chunks=(200,), metric="l2", dtype=torch.float32)
    got = host.funnel_search(q, 4, (8, 24, D), (40, 12), backend="triton")
    want = dev.funnel_search(q, 4, (8, 24, D), (40, 12), backend="torch")
    assert torch.equal(got[1].cpu(), want[1])
