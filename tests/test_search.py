"""Truncated-dimension search: the chunked torch backend against a float64 brute force, rerank /
funnel / adaptive against their reference definitions. (Bad inputs: test_validation.py.)"""
import itertools

import pytest
import torch

import mrl_kernels as mk
from mrl_kernels import reference
from mrl_kernels.ops import search_torch
from mrl_kernels.ops._backend import triton_interpreter_on

METRICS = ("ip", "cosine", "l2")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Q, N, D = 40, 613, 32
SMALL_BUDGET = 8 << 10  # bytes: several row chunks and query batches at these sizes


@pytest.fixture
def small_chunks(monkeypatch):
    """The chunked path with several blocks (the direct path is off: it would take these small shapes)."""
    monkeypatch.setattr(search_torch, "SCORE_CHUNK_BYTES", SMALL_BUDGET)
    monkeypatch.setattr(search_torch, "CPU_BLOCK", SMALL_BUDGET // 4)
    monkeypatch.setattr(search_torch, "DIRECT_BYTES", 0)


def make_data(n_queries=Q, n_rows=N, dim=D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(n_queries, dim, generator=g).to(dtype)
    database = torch.randn(n_rows, dim, generator=g).to(dtype)
    database[5] = 0  # a zero row: cosine scores it 0 (like F.normalize), l2 gives |q|^2
    return queries, database


def check_against_brute_force(scores, ids, queries, database, k, dim, metric, tol=1e-5):
    """Exact up to near-ties, on the same (rounded) stored values computed in float64: the returned
    scores are the k best to `tol` (relative to the scores' scale), each returned id's true score is its
    returned score, ids are unique, and where the k+1 best true scores are separated by more than the
    tolerance the ids equal the brute force's exactly."""
    n_q, n = queries.shape[0], database.shape[0]
    assert scores.shape == ids.shape == (n_q, k)
    assert ids.dtype == torch.int64
    assert scores.dtype == (torch.float64 if database.dtype == torch.float64 else torch.float32)
    q, x = queries.double()[:, :dim], database.double()[:, :dim]
    full = reference.prefix_scores(q, x, metric=metric)  # [Q, N] float64
    kk = min(k + 1, n)
    want, want_ids = reference.prefix_topk(q, x, kk, metric=metric)
    qn, xn = q.norm(dim=1, keepdim=True), x.norm(dim=1).max()
    scale = {"ip": qn * xn, "cosine": torch.ones_like(qn), "l2": qn.square() + xn.square()}[metric]
    atol = tol * scale.clamp_min(1e-30)
    got = scores.double()
    assert ((got - want[:, :k]).abs() <= atol).all(), "scores are not the k best"
    assert ((full.gather(1, ids) - got).abs() <= atol).all(), "a returned score is not its id's score"
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "repeated ids"
    order = got.diff(dim=1)
    assert (order <= 0).all() if metric != "l2" else (order >= 0).all(), "not best first"
    # Positions whose true score is clear of both neighbours (and of the (k+1)-th) must match exactly.
    gap = want.diff(dim=1).abs()  # [Q, kk - 1]
    inf = torch.full((n_q, 1), float("inf"), dtype=gap.dtype)
    left = torch.cat([inf, gap], dim=1)[:, :k]
    right = torch.cat([gap, inf], dim=1)[:, :k]
    clear = (left > 2 * atol) & (right > 2 * atol)
    assert torch.equal(ids[clear], want_ids[:, :k][clear])


def ks():
    return sorted({min(k, N) for k in (1, 7, 200, 2048)})


@pytest.mark.parametrize("dim", [1, D])
@pytest.mark.parametrize("k", ks())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_prefix_topk_torch_exact(small_chunks, metric, dtype, k, dim):
    queries, database = make_data(dtype=dtype)
    scores, ids = mk.prefix_topk(queries, database, k, dim=dim, metric=metric, backend="torch")
    check_against_brute_force(scores, ids, queries, database, k, dim, metric)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_prefix_topk_torch_single_query(small_chunks, metric, dtype):
    queries, database = make_data(n_queries=1, dtype=dtype, seed=1)
    for k, dim in ((1, 16), (9, None), (N, 3)):
        scores, ids = mk.prefix_topk(queries, database, k, dim=dim, metric=metric, backend="torch")
        check_against_brute_force(scores, ids, queries, database, k, dim or D, metric,
                                  tol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_direct_path_for_small_score_matrices(monkeypatch, metric, dtype):
    """Up to DIRECT_BYTES, prefix_topk_torch scores the whole [Q, N] matrix at once (no chunk
    machinery): exact like the chunked path, on strided and full-width inputs, NaN rows first, and no
    gradient to the scores. Cosine scales the rows (Q >= dim / 2) or the scores (below), of the strided
    prefix or (past CPU_COPY_SPAN bytes) of a contiguous copy: every combination is run."""
    calls = []
    chunked = search_torch._prefix_topk_chunked
    monkeypatch.setattr(search_torch, "_prefix_topk_chunked", lambda *a: calls.append(1) or chunked(*a))
    assert 8 * N * max(Q, D) <= search_torch.DIRECT_BYTES
    queries_all, database = make_data(dtype=dtype, seed=4)
    database[100, 2] = float("nan")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    cases = [(1, 3), (7, 16), (200, None), (N, D)]
    for (k, dim), n_q, copy_past in itertools.product(cases, (Q, 2), (search_torch.CPU_COPY_SPAN, 0)):
        monkeypatch.setattr(search_torch, "CPU_COPY_SPAN", copy_past)
        queries = queries_all[:n_q]
        scores, ids = mk.prefix_topk(queries, database, k, dim=dim, metric=metric)
        assert torch.isnan(scores[:, 0]).all() and (ids[:, 0] == 100).all()
        clean = database.clone()
        clean[100] = 0
        scores, ids = mk.prefix_topk(queries, clean, k, dim=dim, metric=metric)
        check_against_brute_force(scores, ids, queries, clean, k, dim or D, metric, tol=tol)
        with monkeypatch.context() as m:  # the chunked path agrees
            m.setattr(search_torch, "DIRECT_BYTES", 0)
            want = mk.prefix_topk(queries, clean, k, dim=dim, metric=metric)
        torch.testing.assert_close(scores, want[0], rtol=tol, atol=tol)
    assert len(calls) == 4 * len(cases)  # only the forced comparisons took the chunked path
    grad = mk.prefix_topk(queries_all.float().requires_grad_(), database.float(), 3, metric=metric)[0]
    assert not grad.requires_grad


def test_which_strided_prefixes_are_copied_first():
    """The direct path copies a strided CPU prefix past the L3 (CPU_COPY_SPAN), or past about the L2 when
    each row's prefix is CPU_COPY_ROW_BYTES or more; never a contiguous one."""
    copied = search_torch._copy_prefix_first
    beyond_l3, beyond_l2, in_l2 = torch.empty(40_000, 256), torch.empty(10_000, 256), torch.empty(1_000, 256)
    assert copied(beyond_l3[:, :16]) and copied(beyond_l2[:, :32]) and copied(beyond_l2[:, :64])
    assert not copied(beyond_l3) and not copied(beyond_l2[:, :16]) and not copied(in_l2[:, :64])


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "chunked"])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_inputs_are_never_modified(monkeypatch, direct, dtype):
    """Cosine scales the database rows in place only in a copy of its own (16-bit upcast, a copied strided
    prefix, the chunk buffer): the caller's queries and database come back bit for bit, on every path."""
    if not direct:
        monkeypatch.setattr(search_torch, "DIRECT_BYTES", 0)
    queries, database = make_data(dtype=dtype, seed=8)
    for copy_past in (search_torch.CPU_COPY_SPAN, 0):
        monkeypatch.setattr(search_torch, "CPU_COPY_SPAN", copy_past)
        for metric, n_q, dim in itertools.product(METRICS, (Q, 2), (3, D)):
            q, db = queries[:n_q].clone(), database.clone()
            mk.prefix_topk(q, db, 5, dim=dim, metric=metric)
            mk.rerank(q, db, torch.zeros(n_q, 6, dtype=torch.int64), 5, dim=dim, metric=metric)
            assert torch.equal(q, queries[:n_q]) and torch.equal(db, database), (metric, n_q, dim)


@pytest.mark.parametrize("cpu", [False, True])
@pytest.mark.parametrize("k", [7, 40])
def test_small_budget_chunks_rows_and_queries(small_chunks, k, cpu):
    """The exactness tests above run with several row chunks and query batches, ragged at the end."""
    qb, nc = search_torch.blocks(Q, N, D, k, 4, cpu=cpu)
    assert 1 < qb < Q and 1 < nc < N and N % nc != 0 and Q % qb != 0
    assert qb * nc * 4 <= SMALL_BUDGET // 2 and nc * D * 4 <= SMALL_BUDGET // 2


@pytest.mark.parametrize("cpu", [False, True])
@pytest.mark.parametrize("k", [1, 10, 200, 2048, 10 ** 6])
@pytest.mark.parametrize("dim", [1, 16, 64, 2048, 10 ** 5])
def test_default_budget_bounds(k, dim, cpu):
    budget = search_torch.SCORE_CHUNK_BYTES // 4
    for n_queries, n_rows in ((100_000, 10 ** 7), (1, 10 ** 7), (100_000, 1), (3, 5)):
        qb, nc = search_torch.blocks(n_queries, n_rows, dim, k, 4, cpu=cpu)
        assert 1 <= qb <= n_queries and 1 <= nc <= n_rows
        assert qb * nc <= budget // 2 or qb == 1
        assert nc * dim <= budget // 2 or nc == 1
        assert qb == 1 or qb * 4 * k <= budget


def test_grouped_topk_is_topk():
    """grouped_topk equals torch.topk as a set of values, with each id's own value, for long and ragged
    rows, ties (integer-valued scores), and NaN (ranked first, as torch.topk does)."""
    g = torch.Generator().manual_seed(3)
    for n, k, group in ((4096, 100, 32), (4096 + 19, 100, 32), (1000, 31, 8), (640, 20, 32)):
        nan = torch.randn(5, n, generator=g)
        nan[0, 7], nan[1, n - 1], nan[2, :40] = float("nan"), float("nan"), float("nan")
        for s in (torch.randn(5, n, generator=g), torch.randint(0, 40, (5, n), generator=g).float(), nan):
            top, ids = search_torch.grouped_topk(s, k, group)
            want = torch.topk(s, k, dim=1).values
            assert torch.equal(top.sort(dim=1, descending=True).values.nan_to_num(), want.nan_to_num())
            assert torch.equal(s.gather(1, ids).nan_to_num(), top.nan_to_num())
            assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_nan_and_inf_rows_surface_first(small_chunks, metric, backend):
    """A NaN in a database row's prefix makes its scores NaN: it ranks first for every metric (as in the
    Triton kernel), never dropped, never replaced by a placeholder id, at k < N and k = N; an overflowing
    row (score +-inf) is an ordinary candidate."""
    queries, database = make_data(n_rows=300)
    database[17, 3] = float("nan")
    database[250, 0] = float("nan")
    database[40] = 1e30  # |x|^2 and q.x overflow fp32
    for k in (5, 300):
        scores, ids = mk.prefix_topk(queries, database, k, dim=16, metric=metric, backend=backend)
        assert torch.isnan(scores[:, :2]).all() and not torch.isnan(scores[:, 2:]).any()
        assert (ids[:, :2].sort(1).values == torch.tensor([17, 250])).all()
        assert ((ids >= 0) & (ids < 300)).all() and (ids.sort(1).values.diff(1) > 0).all()
        if k == 300:
            assert (ids == 40).any(dim=1).all()
    cand = torch.arange(300).expand(Q, -1)
    scores, ids = mk.rerank(queries, database, cand, 5, dim=16, metric=metric, backend=backend)
    assert torch.isnan(scores[:, :2]).all() and (ids[:, :2].sort(1).values == torch.tensor([17, 250])).all()


def test_inputs_that_require_grad():
    """Search takes model outputs as they are (no gradient flows to the scores)."""
    queries, database = make_data()
    queries.requires_grad_(True)
    database.requires_grad_(True)
    for backend in ("torch", "reference"):
        scores, ids = mk.prefix_topk(queries, database, 300, dim=9, metric="cosine", backend=backend)
        assert scores.shape == (Q, 300)
        scores, ids = mk.adaptive_search(queries, database, 10, shortlist=50, shortlist_dim=8, backend=backend)
        assert ids.shape == (Q, 10)


def test_grouped_topk_in_the_search(monkeypatch):
    """prefix_topk takes the grouped path (lowered thresholds) and stays exact."""
    calls = []
    grouped = search_torch.grouped_topk
    monkeypatch.setattr(search_torch, "grouped_topk", lambda *a, **kw: calls.append(1) or grouped(*a, **kw))
    monkeypatch.setattr(search_torch, "GROUPED_K", 4)
    monkeypatch.setattr(search_torch, "GROUPED_ROWS_PER_K", 64)  # 5 x 64 < N: one chunk of N rows, grouped
    monkeypatch.setattr(search_torch, "DIRECT_BYTES", 0)  # grouping is a step of the chunked path
    queries, database = make_data()
    for metric in METRICS:
        scores, ids = mk.prefix_topk(queries, database, 5, dim=9, metric=metric, backend="torch")
        check_against_brute_force(scores, ids, queries, database, 5, 9, metric)
    assert calls


def test_strided_database_view(small_chunks):
    """A column slice of a wider tensor (row stride != D) is searched in place, same result."""
    queries, wide = make_data(n_rows=300, dim=2 * D, dtype=torch.float16)
    view = wide[:, :D]
    assert not view.is_contiguous()
    got = mk.prefix_topk(queries[:, :D], view, 20, dim=11, metric="cosine", backend="torch")
    want = mk.prefix_topk(queries[:, :D].contiguous(), view.contiguous(), 20, dim=11, metric="cosine",
                          backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("metric", METRICS)
def test_auto_on_cpu_is_torch_and_reference_is_exact(metric):
    queries, database = make_data(n_rows=200)
    auto = mk.prefix_topk(queries, database, 5, dim=8, metric=metric)
    torch_ = mk.prefix_topk(queries, database, 5, dim=8, metric=metric, backend="torch")
    assert torch.equal(auto[0], torch_[0]) and torch.equal(auto[1], torch_[1])
    ref = mk.prefix_topk(queries, database, 5, dim=8, metric=metric, backend="reference")
    want = reference.prefix_topk(queries, database, 5, dim=8, metric=metric)
    assert torch.equal(ref[0], want[0]) and torch.equal(ref[1], want[1])


def test_metric_defaults_to_cosine():
    """metric="cosine" is the default of every search op (a prefix of an MRL embedding is not unit-norm)."""
    queries, database = make_data(n_rows=200)
    database[:, :8] *= torch.linspace(0.1, 10, 200)[:, None]  # prefix norms that differ a lot: ip != cosine
    cosine = mk.prefix_topk(queries, database, 5, dim=8, metric="cosine")
    assert torch.equal(mk.prefix_topk(queries, database, 5, dim=8)[1], cosine[1])
    assert not torch.equal(mk.prefix_topk(queries, database, 5, dim=8, metric="ip")[1], cosine[1])
    cand = candidates_for(Q, 200, 30)
    assert torch.equal(mk.rerank(queries, database, cand, 5, dim=8)[1],
                       mk.rerank(queries, database, cand, 5, dim=8, metric="cosine")[1])
    assert torch.equal(mk.adaptive_search(queries, database, 5, shortlist=50, shortlist_dim=8)[1],
                       mk.adaptive_search(queries, database, 5, shortlist=50, shortlist_dim=8, metric="cosine")[1])
    assert torch.equal(mk.funnel_search(queries, database, 5, (4, 8), (50,))[1],
                       mk.funnel_search(queries, database, 5, (4, 8), (50,), metric="cosine")[1])


# ----------------------------------------------------------------------------------------------
# rerank / funnel / adaptive equal their reference definitions
# ----------------------------------------------------------------------------------------------

def candidates_for(n_queries, n_rows, s, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n_rows, generator=g)[:s] for _ in range(n_queries)])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("metric", METRICS)
def test_rerank_equals_reference(small_chunks, metric, dtype, tol):
    queries, database = make_data(n_rows=400, dtype=dtype)
    cand = candidates_for(Q, 400, 60)
    cand[0, 3] = 5  # the zero row
    for k, dim in ((1, 1), (13, 20), (60, None)):
        got_s, got_i = mk.rerank(queries, database, cand, k, dim=dim, metric=metric, backend="torch")
        want_s, want_i = reference.rerank(queries, database, cand, k, dim=dim, metric=metric)
        assert got_s.dtype == dtype and got_i.dtype == torch.int64
        torch.testing.assert_close(got_s, want_s, rtol=tol, atol=tol * 10)
        if dim != 1 or metric != "cosine":  # cosine at one dim is +-1: all ties
            assert torch.equal(got_i, want_i)
        assert torch.equal(mk.rerank(queries, database, cand, k, dim=dim, metric=metric, backend="reference")[1],
                           want_i)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_rerank_takes_int32_candidates(backend):
    """int32 candidate ids are accepted (as int32 targets are elsewhere) and give the int64 answer."""
    queries, database = make_data(n_rows=400)
    cand = candidates_for(Q, 400, 60)
    want = mk.rerank(queries, database, cand, 10, dim=20, metric="l2", backend=backend)
    got = mk.rerank(queries, database, cand.int(), 10, dim=20, metric="l2", backend=backend)
    assert got[1].dtype == torch.int64
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rerank_16bit_storage(small_chunks):
    queries, database = make_data(n_rows=400, dtype=torch.bfloat16)
    cand = candidates_for(Q, 400, 60)
    got_s, got_i = mk.rerank(queries, database, cand, 10, dim=32, metric="l2")
    want_s, want_i = reference.rerank(queries.double(), database.double(), cand, 10, dim=32, metric="l2")
    assert got_s.dtype == torch.float32
    torch.testing.assert_close(got_s.double(), want_s, rtol=1e-5, atol=1e-4)
    assert torch.equal(got_i, want_i)


FUNNELS = [((4, 8, 16, D), (100, 50, 20)), ((2,), ()), ((8, 8, D), (200, 200))]


@pytest.mark.parametrize("dims,shortlists", FUNNELS, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_funnel_equals_reference(small_chunks, metric, dims, shortlists):
    queries, database = make_data(n_rows=400, dtype=torch.float64)
    got = mk.funnel_search(queries, database, 10, dims, shortlists, metric=metric, backend="torch")
    want = reference.funnel_search(queries, database, 10, dims, shortlists, metric=metric)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], want[1])
    ref = mk.funnel_search(queries, database, 10, dims, shortlists, metric=metric, backend="reference")
    assert torch.equal(ref[0], want[0]) and torch.equal(ref[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_funnel_16bit_storage(small_chunks, dtype):
    queries, database = make_data(dtype=dtype)
    got = mk.funnel_search(queries, database, 10, (8, 16, D), (200, 50), metric="cosine")
    want = reference.funnel_search(queries.double(), database.double(), 10, (8, 16, D), (200, 50), metric="cosine")
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("metric", METRICS)
def test_adaptive_equals_reference(small_chunks, metric):
    queries, database = make_data(dtype=torch.float64)
    for kwargs in (dict(), dict(shortlist=50, shortlist_dim=4, rerank_dim=24)):
        got = mk.adaptive_search(queries, database, 10, metric=metric, backend="torch", **kwargs)
        want = reference.adaptive_search(queries, database, 10, metric=metric, **kwargs)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        assert torch.equal(got[1], want[1])
        ref = mk.adaptive_search(queries, database, 10, metric=metric, backend="reference", **kwargs)
        assert torch.equal(ref[0], want[0]) and torch.equal(ref[1], want[1])


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_triton_backend_through_the_ops(kernel_device, metric):
    """The public ops dispatch to the Triton top-k (interpreter on the CPU): same answers as the torch path,
    on a strided prefix view, for the plain search and as the first stage of a funnel."""
    g = torch.Generator().manual_seed(7)
    database = torch.randn(333, 90, generator=g).to(kernel_device)[:, :70]
    queries = torch.randn(5, 70, generator=g).to(kernel_device)
    for k, dim in ((7, 17), (40, 70)):
        got = mk.prefix_topk(queries, database, k, dim=dim, metric=metric, backend="triton")
        want = mk.prefix_topk(queries.cpu(), database.cpu(), k, dim=dim, metric=metric, backend="torch")
        assert torch.equal(got[1].cpu(), want[1])
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-5)
    funnel = dict(k=5, dims=(8, 32, 70), shortlists=(60, 20), metric=metric)
    got = mk.funnel_search(queries, database, backend="triton", **funnel)
    want = mk.funnel_search(queries.cpu(), database.cpu(), backend="torch", **funnel)
    assert torch.equal(got[1].cpu(), want[1])


def test_triton_row_limit():
    """More rows than the Triton kernels index: an explicit backend='triton' is refused by name before any
    launch, 'auto' takes the torch backend (the dispatch rule itself: auto picks Triton only on CUDA)."""
    from mrl_kernels.ops import search

    huge = torch.zeros(1, 4).expand(search.TRITON_MAX_ROWS + 1, 4)  # no memory behind the rows
    queries = torch.ones(2, 4)
    if triton_interpreter_on():
        with pytest.raises(ValueError, match="at most 1073741824 database rows"):
            mk.prefix_topk(queries, huge, 3, backend="triton")
        with pytest.raises(ValueError, match="at most 1073741824 database rows"):
            mk.adaptive_search(queries, huge, 3, shortlist=5, shortlist_dim=2, backend="triton")
    cuda = torch.device("cuda")
    assert search.search_backend("prefix_topk", "auto", cuda, search.TRITON_MAX_ROWS + 1) == "torch"
    assert search.search_backend("prefix_topk", "auto", cuda, search.TRITON_MAX_ROWS) == "triton"
    assert search.search_backend("prefix_topk", "torch", cuda, search.TRITON_MAX_ROWS + 1) == "torch"
