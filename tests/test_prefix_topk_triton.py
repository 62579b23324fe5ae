"""The Triton prefix top-k (tile maxima, tile selection, gather re-score) and re-rank against a float64 brute
force on the same (rounded) values: every metric and dtype, k = 1, k below and above a tile's height, k = N,
dim = 1, an odd dim, d = 8 and dim = D, Q = 1 and Q not a multiple of the query block, N not a multiple of any
tile, a database that is a column slice of a wider tensor (row stride > D, read in place), NaN rows, exact ties
(smallest id first, every run) and near-duplicates within the selection margin."""
import pytest
import torch

from mrl_kernels import reference
from mrl_kernels.kernels import gather_scores
from mrl_kernels.kernels.gather_scores import decode_keys, gather_keys
from mrl_kernels.kernels.prefix_tile_max import tile_maxima
from mrl_kernels.kernels.prefix_topk import prefix_topk_triton, rerank_triton, select_tiles, tile_rows

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


CASES = [  # (Q, N, D, dim, k)
    (70, 333, 40, 40, 7),     # two query blocks of fp32's 64, the second partial; dim = D
    (1, 301, 24, 24, 1),      # one query, k = 1
    (70, 333, 40, 1, 7),      # dim = 1
    (33, 517, 40, 17, 100),   # odd dim, k above the tile height
    (9, 1000, 24, 8, 200),    # d = 8, k well above the tile height
    (5, 301, 24, 24, 301),    # k = N
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
def test_tiles_splits_and_batches(kernel_device, metric):
    """Every tile height, one to many database splits (a short last split), and a budget of two queries per
    batch (each batch its own tile maxima and selection)."""
    torch.manual_seed(1)
    q, x = make(37, 450, 32, torch.float32, kernel_device, wide=3)
    for block_n in (16, 128):
        for splits in (1, 30):
            check(*prefix_topk_triton(q, x, 5, 20, metric, block_n=block_n, splits=splits), q, x, 5, 20, metric)
    per_query = 8 * 15 + 16 * 40 * 32  # _batch_queries' estimate at N = 450, k = 30, 32-row tiles
    check(*prefix_topk_triton(q, x, 30, 20, metric, block_n=32, budget_bytes=2 * per_query), q, x, 30, 20, metric)


@pytest.mark.triton
def test_tile_maxima_match_the_brute_force(kernel_device):
    """Pass 1 alone: the best t of every tile (t = q.x, q.x / |x| or 2 q.x - |x|^2), the last tile short."""
    torch.manual_seed(3)
    q, x = make(5, 203, 24, torch.float32, kernel_device, wide=2)
    qd, xd = q.double().cpu()[:, :19], x.double().cpu()[:, :19]
    ts = {"ip": qd @ xd.T, "cosine": (qd @ xd.T) / xd.norm(dim=1), "l2": 2 * qd @ xd.T - xd.square().sum(1)}
    for metric, t in ts.items():
        got = tile_maxima(q, x, 19, metric, 32).cpu().double()
        want = torch.nn.functional.pad(t, (0, 7 * 32 - 203), value=-float("inf")).view(5, 7, 32).amax(2)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), metric


@pytest.mark.triton
def test_zero_rows_cosine(kernel_device):
    """A zero database row scores 0 under cosine (as F.normalize), and a zero query scores 0 everywhere."""
    q, x = make(3, 100, 16, torch.float32, kernel_device)
    x[5] = 0
    q[1] = 0
    scores, ids = prefix_topk_triton(q, x, 100, 16, "cosine")
    got = torch.zeros(3, 100).scatter_(1, ids.cpu(), scores.cpu())
    assert (got[:, 5] == 0).all() and (got[1] == 0).all()
    assert torch.equal(ids[1].cpu(), torch.arange(100))  # all tied: ascending ids


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("k", [4, 200])
def test_nan_rows_surface_first(kernel_device, metric, k):
    """A NaN in a database row makes that row's scores NaN; they rank first for every metric, never dropped,
    smallest id first."""
    q, x = make(4, 300, 16, torch.float16, kernel_device)
    x[250, 0] = float("nan")
    x[17, 3] = float("nan")
    scores, ids = prefix_topk_triton(q, x, k, 16, metric)
    assert torch.isnan(scores[:, :2]).all() and not torch.isnan(scores[:, 2:]).any()
    assert (ids[:, :2].cpu() == torch.tensor([17, 250])).all()


@pytest.mark.triton
def test_more_nan_rows_than_k(kernel_device):
    """Every row of several tiles NaN: the k NaN rows with the smallest ids, wherever they lie."""
    q, x = make(2, 500, 8, torch.float32, kernel_device)
    nan_rows = torch.tensor([3, 40, 41, 200, 201, 202, 499])
    x[nan_rows, 1] = float("nan")
    scores, ids = prefix_topk_triton(q, x, 5, 8, "l2", block_n=32)
    assert torch.isnan(scores).all() and (ids.cpu() == nan_rows[:5]).all()


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_inf_and_nan_rows(kernel_device, metric):
    """An inf in one row (an infinite score, or NaN for l2's inf - inf) beside a NaN row: the brute force's
    order exactly, also at k = 1 where tau is infinite (the margin stays finite: max_prefix_norm caps at the
    largest float)."""
    torch.manual_seed(13)
    q, x = make(3, 400, 16, torch.float32, kernel_device)
    q = q.abs()  # positive queries: the +inf row scores +inf under ip
    x[30, 2] = float("inf")
    x[333, 5] = float("nan")
    scores, ids = prefix_topk_triton(q, x, 6, 16, metric, block_n=32)
    # the brute force's order: NaN first (torch.sort puts NaN above inf), equal scores in ascending id
    want = torch.sort(brute_force(q, x, 16, metric), dim=1, descending=True, stable=True).indices[:, :6]
    assert torch.equal(ids.cpu(), want)
    assert torch.isnan(scores[:, 0]).all() and (ids[:, 0].cpu() == (30 if metric == "l2" else 333)).all()
    top1 = prefix_topk_triton(q, x, 1, 16, metric, block_n=32)[1]
    assert torch.equal(top1.cpu(), want[:, :1])


def exact_ties(kernel_device, n=1700):
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-1, 2, (6, 8), generator=g).float().to(kernel_device)
    x = torch.randint(-1, 2, (n, 8), generator=g).float().to(kernel_device)
    return q, x


def expected_with_smallest_ids(q, x, k, dim, metric):
    """The reference's best k by score, equal scores in ascending id (stable sort of the float64 scores)."""
    ref = brute_force(q, x, dim, metric)
    order = torch.sort(ref, dim=1, descending=True, stable=True).indices[:, :k]
    return ref.gather(1, order), order


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_ties_take_the_smallest_ids(kernel_device, metric):
    """Integer data: hundreds of rows share each score. The ids are exactly the reference's with ties in
    ascending id, and the same on a second run."""
    q, x = exact_ties(kernel_device)
    want_scores, want_ids = expected_with_smallest_ids(q, x, 25, 8, metric)
    for _ in range(2):
        scores, ids = prefix_topk_triton(q, x, 25, 8, metric, block_n=32)
        oriented = -scores.cpu().double() if metric == "l2" else scores.cpu().double()
        assert torch.allclose(oriented, want_scores, rtol=1e-6, atol=1e-6)
        assert torch.equal(ids.cpu(), want_ids)


@pytest.mark.triton
def test_near_duplicates_within_the_margin(kernel_device):
    """The query's best row copied into every tile, the copies a few ulps apart: all those tiles have maxima
    within the selection margin of tau, so more than k are selected, and the answer is still exact."""
    torch.manual_seed(12)
    q, x = make(1, 640, 16, torch.float32, kernel_device)
    for t in range(20):  # scores 3 |q|^2 (1 + t 1e-7), far above the random rows'
        x[t * 32 + 5] = 3 * q[0] * (1 + t * 1e-7)
    maxima = tile_maxima(q, x, 16, "ip", 32)
    from mrl_kernels.kernels.prefix_topk import max_prefix_norm, query_norms, selection_margin

    margin = selection_margin(query_norms(q, 16), 16, "ip", max_prefix_norm(x, 16))
    assert select_tiles(maxima.clone(), 2, margin, None).shape[1] > 2
    check(*prefix_topk_triton(q, x, 2, 16, "ip", block_n=32), q, x, 2, 16, "ip")


def test_select_tiles():
    """Every tile within the margin of the k-th largest maximum (for l2 also of the |q|^2 ceiling), NaN as +inf,
    all tiles when there are no more than k; the width is the most any query needs."""
    maxima = torch.tensor([[5.0, 1.0, 4.0, 3.95, 0.0, 2.0],
                           [float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    margin = torch.tensor([0.1, 0.1], dtype=torch.float64)
    tiles = select_tiles(maxima.clone(), 2, margin, None)
    assert tiles.dtype == torch.int32 and tiles.shape == (2, 3)
    assert set(tiles[0].tolist()) == {0, 2, 3} and set(tiles[1, :2].tolist()) == {0, 5}
    ceiling = torch.tensor([1.5, 9.0], dtype=torch.float64)  # query 0: rows at distance 0 possible from t >= 1.5
    assert set(select_tiles(maxima.clone(), 2, margin, ceiling)[0].tolist()) == {0, 2, 3, 5}
    assert torch.equal(select_tiles(maxima.clone(), 6, margin, None), torch.arange(6, dtype=torch.int32).expand(2, 6))
    wide = torch.zeros(1, 100)  # all tied: beyond topk's first guess of k + 8 tiles
    assert select_tiles(wide, 3, torch.zeros(1, dtype=torch.float64), None).shape == (1, 100)


def test_database_splits_fill_the_gpu_within_the_grid(monkeypatch):
    """About 8 programs per SM (4 waves of 2), at least 4 tiles each, never more than grid axis 1 holds."""
    from types import SimpleNamespace

    from mrl_kernels.kernels import prefix_tile_max

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert prefix_tile_max.database_splits(79, 78_125, cuda) == 14  # Q = 10,000 in 128-query blocks, N = 10M
    assert prefix_tile_max.database_splits(1, 10**8, cuda) == 1056
    assert prefix_tile_max.database_splits(1, 3, cuda) == 1
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=10**5))
    assert prefix_tile_max.database_splits(1, 10**9, cuda) == 65_535


def test_tile_rows():
    assert tile_rows(10_000_000, 200) == 128 and tile_rows(10_000_000, 2048) == 64 and tile_rows(333, 7) == 32


# ---- gather-dot re-score and re-rank ----

@pytest.mark.triton
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rerank_matches_the_reference(kernel_device, metric, dtype):
    """Candidates with repeats, int32 and int64, re-scored at 70 of 100 dims (a K loop, its tail masked)."""
    torch.manual_seed(4)
    q, x = make(11, 257, 100, dtype, kernel_device, wide=5)
    candidates = torch.randint(0, 257, (11, 40), device=kernel_device)
    candidates[:, 1] = candidates[:, 0]
    want_s, want_i = reference.rerank(q.double(), x.double(), candidates, 12, dim=70, metric=metric)
    for ids in (candidates, candidates.int()):
        scores, got = rerank_triton(q, x, ids, 12, 70, metric)
        assert torch.allclose(scores.double(), want_s, rtol=1e-5, atol=1e-4)
        assert torch.equal(torch.sort(got, 1).values, torch.sort(want_i, 1).values)


@pytest.mark.triton
def test_gather_writes_every_slot_and_marks_missing_rows(kernel_device, monkeypatch):
    """Launched on a poisoned buffer: every key written; a tile's rows past N get the missing-row key (below
    every real one). Grid axis 1 split over several launches (a tiny limit here) gives the same keys."""
    torch.manual_seed(2)
    q, x = make(3, 70, 8, torch.float16, kernel_device, wide=5)
    poison = 0x7FFFFFFFFFFFFFFF  # would decode as a NaN score with a negative id
    empty = torch.empty
    monkeypatch.setattr(gather_scores.torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(poison))
    tiles = torch.tensor([[2, 0], [1, 2], [2, 1]], dtype=torch.int32, device=kernel_device)
    keys = gather_keys(q, x, tiles, 8, "l2", rows_per_id=32)
    assert keys.shape == (3, 64) and (keys != poison).all()
    missing = (keys >> 32) == -2 ** 31
    assert missing.sum().item() == 3 * 26  # tile 2 holds rows 64..95, 26 of them past N = 70
    scores, ids = decode_keys(keys[~missing].view(3, 38), "l2")
    assert torch.allclose(-scores.double(), brute_force(q, x, 8, "l2").gather(1, ids.cpu()), rtol=1e-4, atol=1e-3)
    monkeypatch.setattr(gather_scores, "MAX_GRID_Y", 1)  # one 128-slot block per launch: 4 ids of 32 rows
    assert torch.equal(gather_keys(q, x, tiles.repeat(1, 5), 8, "l2", rows_per_id=32), keys.repeat(1, 5))


def test_keys_decode_and_order():
    """The key order is (score, then smallest row); decode returns both, l2 as distances (no -0.0)."""
    scores = torch.tensor([[1.5, -2.0, 1.5, float("nan"), 0.0, -0.0]])
    bits = scores.view(torch.int32)
    hi = torch.where(torch.isnan(scores), torch.tensor(0x7FFFFFFF), bits ^ ((bits >> 31) & 0x7FFFFFFF))
    hi = torch.where(scores == 0, torch.zeros_like(hi), hi)  # the kernel adds 0.0: -0.0 keys as 0.0
    rows = torch.arange(6)
    keys = (hi.long() << 32) | (0xFFFFFFFF - rows)
    best = torch.topk(keys, 6, dim=1).values
    s, i = decode_keys(best, "ip")
    assert i.tolist() == [[3, 0, 2, 4, 5, 1]]
    d, _ = decode_keys(best, "l2")
    assert torch.equal(d[0, 3:].abs(), d[0, 3:]) and not torch.signbit(d[0, 3:]).any()


@pytest.mark.cuda
@pytest.mark.parametrize("k", [10, 200, 2048])
def test_search_on_the_gpu(k):
    """The search as launched on a GPU (many database splits and query blocks in flight) at real k."""
    torch.manual_seed(10)
    q, x = make(100, 300_001, 40, torch.float16, "cuda", wide=8)
    for metric in ("ip", "cosine", "l2"):
        check(*prefix_topk_triton(q, x, k, 16, metric), q, x, k, 16, metric)
