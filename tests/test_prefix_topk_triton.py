"""The prefix top-k Triton kernel against a float64 brute force on the same (rounded) values: every metric and
dtype, k below the in-kernel cap, at it, and above it (the chunked path), dim = 1 and dim = D, Q = 1 and Q not a
multiple of the query block, N not a multiple of any tile, and a database that is a column slice of a wider
tensor (row stride > D, read in place)."""
import pytest
import torch
import triton

from mrl_kernels.kernels.prefix_filter import filter_config, filtered_topk
from mrl_kernels.kernels.prefix_scores import decode, launch_config
from mrl_kernels.kernels.prefix_topk import _launch, prefix_topk_triton

TOL = 1e-5  # fp32 accumulation of exact products (16-bit inputs are compared on their rounded values)


def brute_force(q, x, dim, metric):
    """[Q, N] float64 scores, larger is better (minus the squared distance for l2)."""
    q, x = q[:, :dim].double().cpu(), x[:, :dim].double().cpu()
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ip = q @ x.T
    if metric == "l2":
        return -(q.square().sum(1)[:, None] + x.square().sum(1)[None, :] - 2 * ip).clamp_min(0)
    return ip


def check(scores, ids, q, x, k, dim, metric):
    n_q, n = q.shape[0], x.shape[0]
    assert scores.shape == ids.shape == (n_q, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    scores, ids = scores.cpu(), ids.cpu()
    assert torch.isfinite(scores).all() and ((ids >= 0) & (ids < n)).all()
    assert all(len(set(row.tolist())) == k for row in ids)  # no row twice
    ref = brute_force(q, x, dim, metric)
    ref_best, ref_ids = torch.topk(ref, k, dim=1)
    # Tolerance on the scale of the terms that were summed (l2 cancels |q|^2 + |x|^2 against 2 q.x).
    qn, xn = q[:, :dim].double().cpu().norm(dim=1), x[:, :dim].double().cpu().norm(dim=1)
    scale = {"ip": qn[:, None] * xn.max(), "cosine": torch.ones(n_q, 1, dtype=torch.float64),
             "l2": qn[:, None] ** 2 + xn.max() ** 2}[metric]
    oriented = -scores.double() if metric == "l2" else scores.double()
    assert ((oriented - ref_best).abs() <= TOL * scale).all()              # the k best scores, best first
    assert ((ref.gather(1, ids) - ref_best).abs() <= TOL * scale).all()    # each id really scores that
    # Ids identical to the brute force wherever its scores are not within the tolerance of a tie (with either
    # neighbour, the first one left out included).
    nxt = torch.topk(ref, min(k + 1, n), dim=1).values
    if k == n:
        nxt = torch.cat([nxt, torch.full((n_q, 1), -float("inf"), dtype=torch.float64)], 1)
    step = nxt[:, :-1] - nxt[:, 1:]
    gaps = torch.minimum(step, torch.cat([torch.full((n_q, 1), float("inf"), dtype=torch.float64), step[:, :-1]], 1))
    clear = gaps > 2 * TOL * scale
    assert (ids[clear] == ref_ids[clear]).all()
    return clear.float().mean().item()


def make(n_q, n, d, dtype, device, wide=0):
    q = torch.randn(n_q, d, dtype=dtype, device=device)
    x = torch.randn(n, d + wide, dtype=dtype, device=device)[:, :d]
    return q, x


CASES = [  # (Q, N, D, dim, k): ks 1, 8, 128 in the kernel; 200 and N in the chunked path
    (70, 333, 40, 40, 7),
    (1, 301, 24, 24, 1),
    (70, 333, 40, 1, 7),
    (33, 517, 40, 17, 100),
    (70, 333, 40, 33, 200),
    (5, 301, 24, 24, 301),  # k = 2048 capped at N
]


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_q,n,d,dim,k", CASES)
def test_matches_float64_brute_force(kernel_device, n_q, n, d, dim, k, dtype, metric):
    torch.manual_seed(hash((n_q, n, d, dim, k)) % 1000)
    q, x = make(n_q, n, d, dtype, kernel_device, wide=7)
    assert x.stride(0) > d
    scores, ids = prefix_topk_triton(q, x, k, dim, metric)
    clear = check(scores, ids, q, x, k, dim, metric)
    if dtype == torch.float32 and dim > 1:
        assert clear > 0.9  # on tie-free data the ids are compared almost everywhere


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_splits_and_chunks(kernel_device, metric):
    """Several database splits (candidate merge across splits, a short last split padded) and small score
    chunks (several query batches and database chunks in the k > cap path)."""
    torch.manual_seed(1)
    q, x = make(37, 450, 32, torch.float32, kernel_device, wide=3)
    for splits in (1, 3, 8):
        check(*prefix_topk_triton(q, x, 5, 32, metric, splits=splits), q, x, 5, 32, metric)
    check(*prefix_topk_triton(q, x, 300, 20, metric, chunk_elems=4000), q, x, 300, 20, metric)


@pytest.mark.triton
def test_zero_rows_cosine(kernel_device):
    """A zero database row scores 0 under cosine (as F.normalize), and a zero query scores 0 everywhere."""
    q, x = make(3, 100, 16, torch.float32, kernel_device)
    x[5] = 0
    q[1] = 0
    scores, ids = prefix_topk_triton(q, x, 100, 16, "cosine")
    got = torch.zeros(3, 100).scatter_(1, ids.cpu(), scores.cpu())
    assert (got[:, 5] == 0).all() and (got[1] == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("k", [4, 200])
def test_nan_rows_surface_first(kernel_device, metric, k):
    """A NaN in a database row makes that row's scores NaN; they rank first for every metric, never dropped."""
    q, x = make(4, 300, 16, torch.float32, kernel_device)
    x[17, 3] = float("nan")
    x[250, 0] = float("nan")
    scores, ids = prefix_topk_triton(q, x, k, 16, metric)
    assert torch.isnan(scores[:, :2]).all() and not torch.isnan(scores[:, 2:]).any()
    assert (ids[:, :2].sort(1).values.cpu() == torch.tensor([17, 250])).all()


@pytest.mark.triton
@pytest.mark.parametrize("select", [True, False])
def test_outputs_fully_written(kernel_device, select):
    """Both kernel modes write every element of the buffers the host allocates with torch.empty: launched here
    on poisoned buffers, no poison survives (candidate keys: a short last split's padding is written too)."""
    torch.manual_seed(2)
    q, x = make(9, 130, 8, torch.float32, kernel_device, wide=5)
    poison = 0x7FFFFFFFFFFFFFFF  # would decode as a NaN score with id 2**32 - 1
    if select:
        cfg = launch_config(torch.float32, 8, 4)
        per_split, splits = cfg["BLOCK_N"], 3  # 130 rows: the last split holds 2 real rows, 62 padded
        out = torch.full((9, splits * 4), poison, dtype=torch.int64, device=kernel_device)
        _launch(q, x, out, 8, "ip", cfg, True, per_split, splits)
        assert (out != poison).all()
        top, ids = decode(torch.topk(out, 3, dim=1).values, "ip")
        check(top, ids, q, x, 3, 8, "ip")
    else:
        cfg = launch_config(torch.float32, 8, 1)
        out = torch.full((9, 130), float("nan"), device=kernel_device)
        _launch(q, x, out, 8, "l2", cfg, False, cfg["BLOCK_N"], 3)
        assert torch.allclose(-out.cpu().double(), -brute_force(q, x, 8, "l2"), rtol=1e-5, atol=1e-4)


# ---- k > KS_MAX on a database of at least k tiles: the threshold filter (prefix_filter.py) ----

@pytest.fixture
def filter_counts(monkeypatch):
    """The (keys above tau, keys equal to tau) counts and capacity of every filter launch, in order."""
    from mrl_kernels.kernels import prefix_filter

    seen, run = [], prefix_filter._filter

    def spy(queries, database, tau, k, dim, metric, cfg, capacity):
        keys, count = run(queries, database, tau, k, dim, metric, cfg, capacity)
        seen.append((count.cpu(), capacity))
        return keys, count

    monkeypatch.setattr(prefix_filter, "_filter", spy)
    return seen


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_filter_matches_float64_brute_force(kernel_device, filter_counts, metric, dtype):
    """Q = 70 (two query blocks, the second partial), N not a multiple of the tile, a strided prefix, odd dim.
    The default capacity fits (one filter launch per batch); a capacity of 3 overflows for every query, which
    are then filtered again at their exact count (exact)."""
    torch.manual_seed(5)
    q, x = make(70, 1541, 24, dtype, kernel_device, wide=5)
    check(*filtered_topk(q, x, 20, 17, metric), q, x, 20, 17, metric)
    assert [c for _, c in filter_counts] == [80, 80]  # two batches of whole query blocks (64 + 6), no re-filter
    assert all((count[:, 0] <= 80).all() for count, _ in filter_counts)
    filter_counts.clear()
    check(*filtered_topk(q, x, 20, 17, metric, capacity=3), q, x, 20, 17, metric)
    (first, cap1), (_, again1), (second, cap2), (_, again2) = filter_counts
    assert cap1 == cap2 == 3 and (first[:, 0] > 3).all() and (second[:, 0] > 3).all()
    assert (again1, again2) == (int(first[:, 0].max()), int(second[:, 0].max()))


@pytest.mark.triton
def test_filter_small_budget(kernel_device, filter_counts):
    """A budget of two queries per batch and one per re-filter: every batch and re-filter writes its own rows."""
    torch.manual_seed(11)
    q, x = make(6, 1541, 24, torch.float32, kernel_device)
    tiles = triton.cdiv(1541, filter_config(torch.float32, 17)["BLOCK_N"])
    budget = 2 * (tiles * 4 + (3 + 20) * 8) + 1
    check(*filtered_topk(q, x, 20, 17, "l2", capacity=3, budget_bytes=budget), q, x, 20, 17, "l2")
    assert [len(count) for count, _ in filter_counts] == [2, 1, 1] * 3


@pytest.mark.triton
def test_filter_with_the_best_rows_in_few_tiles(kernel_device):
    """Rows sorted by score for the first query: its k best fill the first tiles, so tau (the k-th best tile
    maximum) is far below its k-th best score and most rows pass: the overflow path, exact."""
    torch.manual_seed(6)
    q, x = make(3, 3000, 16, torch.float32, kernel_device)
    x = x[torch.argsort(brute_force(q, x, 16, "ip")[0].to(kernel_device), descending=True)]
    scores, ids = filtered_topk(q, x, 30, 16, "ip")
    check(scores, ids, q, x, 30, 16, "ip")
    assert (ids[0].sort().values.cpu() == torch.arange(30)).all()


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_filter_ties_at_the_threshold(kernel_device, filter_counts, metric):
    """Integer data: more than k rows share the threshold key, so the tie list fills and the rest are dropped.
    The answer takes as many of them as it needs; any choice among equal scores is right, so compare the
    scores and each id's own score."""
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-1, 2, (6, 8), generator=g).float().to(kernel_device)
    x = torch.randint(-1, 2, (1700, 8), generator=g).float().to(kernel_device)
    k = 25
    scores, ids = filtered_topk(q, x, k, 8, metric)
    ref = brute_force(q, x, 8, metric)
    oriented = -scores.cpu().double() if metric == "l2" else scores.cpu().double()
    assert torch.equal(oriented, torch.topk(ref, k, dim=1).values)
    assert torch.equal(ref.gather(1, ids.cpu()), oriented)
    assert all(len(set(row.tolist())) == k for row in ids.cpu())
    ((count, _),) = filter_counts
    assert ((count[:, 0] < k) & (count[:, 1] > k)).any()  # a query that needs ties and has more than room


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_filter_nan_rows_surface_first(kernel_device, metric):
    torch.manual_seed(9)
    q, x = make(4, 1400, 16, torch.float32, kernel_device)
    x[17, 3] = float("nan")
    x[1250, 0] = float("nan")
    scores, ids = filtered_topk(q, x, 21, 16, metric)
    assert torch.isnan(scores[:, :2]).all() and not torch.isnan(scores[:, 2:]).any()
    assert (ids[:, :2].sort(1).values.cpu() == torch.tensor([17, 1250])).all()


@pytest.mark.triton
def test_large_k_dispatch(kernel_device, monkeypatch):
    """prefix_topk_triton takes the filter for k > KS_MAX where the database has k tiles, else the chunked
    scores; both exact."""
    from mrl_kernels.kernels import prefix_topk

    taken = []
    monkeypatch.setattr(prefix_topk, "KS_MAX", 8)
    monkeypatch.setattr(prefix_topk, "_chunked_topk",
                        lambda *a, _f=prefix_topk._chunked_topk: taken.append("chunked") or _f(*a))
    monkeypatch.setattr(prefix_topk, "filtered_topk",
                        lambda *a, _f=prefix_topk.filtered_topk: taken.append("filter") or _f(*a))
    torch.manual_seed(8)
    tile = filter_config(torch.float32, 16)["BLOCK_N"]
    for n, path in ((19 * tile + 1, "filter"), (19 * tile, "chunked")):  # 20 tiles (the last of one row), 19
        q, x = make(5, n, 16, torch.float32, kernel_device)
        check(*prefix_topk_triton(q, x, 20, 16, "l2"), q, x, 20, 16, "l2")
        assert taken.pop() == path


def test_filter_refuses_a_short_count():
    """Fewer than k keys at or above tau (the two passes disagreeing) is an error, not NaN-looking padding."""
    from mrl_kernels.kernels.prefix_filter import _check_count

    _check_count(torch.tensor([[3, 1], [0, 9]], dtype=torch.int32), 4)  # 3 + 1 and 0 + min(9, 4)
    with pytest.raises(RuntimeError, match="found 3 < k=4 rows"):
        _check_count(torch.tensor([[3, 1], [2, 1]], dtype=torch.int32), 4)


def test_filter_needs_k_tiles():
    q, x = make(2, 100, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="at least k=5 tiles"):
        filtered_topk(q, x, 5, 8, "ip")


@pytest.mark.cuda
@pytest.mark.parametrize("k", [200, 2048])
def test_filter_on_the_gpu(k):
    """The filter as launched on a GPU (many database splits in flight, concurrent slot reservations) through
    prefix_topk_triton at a real k > KS_MAX."""
    torch.manual_seed(10)
    q, x = make(100, 300_001, 40, torch.float16, "cuda", wide=8)
    for metric in ("ip", "l2"):
        check(*prefix_topk_triton(q, x, k, 16, metric), q, x, k, 16, metric)
