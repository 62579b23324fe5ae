"""mrl_kernels.metrics and mrl_kernels.plots: every metric against numbers worked out by hand on tiny inputs,
against a float64 brute force (the paper's formulas, transcribed loop by loop) on random data at odd sizes,
argument errors, and the plots' files."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

from mrl_kernels import metrics, plots
from mrl_kernels.ops import search_torch


# ----------------------------------------------------------------------------------------------
# Hand-made retrieval data: 6 database rows, 4 queries, D = 3, evaluated at dims (2, 3)
# ----------------------------------------------------------------------------------------------
# On the first 2 dims every row is a unit vector at an angle, so cosine ranks database rows by angular distance:
#   database angles 0, 10, 30, 60, 100, 180 degrees, labels 0, 1, 0, 1, 0, 0 (class 0 has 4 rows, class 1 has 2)
#   query angles    4, 48, 170, 97 degrees,          labels 0, 1, 1, 0
# The third coordinate is 5 for database row 5 (0 for the others) and 1 for every query, so at 3 dims row 5
# scores (cos(a - 180) + 5) / sqrt(26) against the others' cos(a - b) (each up to the same query norm):
#   dim 2 rankings: q0: 0 1 2 3 4 5   q1: 3 2 1 0 4 5   q2: 5 4 3 2 1 0   q3: 4 3 2 5 1 0
#   dim 3 rankings: q0: 0 1 2 5 3 4   q1: 3 2 5 1 0 4   q2: 5 4 3 2 1 0   q3: 5 4 3 2 1 0
# (e.g. q3 at 3 dims: row 5 (cos 83 + 5) / sqrt 26 = 1.0045 > row 4 cos 3 = 0.9986 > row 3 cos 37 = 0.799.)
DB_ANGLES, DB_THIRD, DB_LABELS = (0, 10, 30, 60, 100, 180), (0, 0, 0, 0, 0, 5), (0, 1, 0, 1, 0, 0)
Q_ANGLES, Q_LABELS = (4, 48, 170, 97), (0, 1, 1, 0)


def _unit_rows(angles, third):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a)), t] for a, t in zip(angles, third)])


@pytest.fixture
def hand():
    return (_unit_rows(Q_ANGLES, (1,) * 4), torch.tensor(Q_LABELS),
            _unit_rows(DB_ANGLES, DB_THIRD), torch.tensor(DB_LABELS))


def test_retrieval_metrics_by_hand(hand):
    q, ql, db, dbl = hand
    out = metrics.retrieval_metrics(q, ql, db, dbl, dims=(3, 2), k=3)
    assert list(out) == [3, 2]  # the order of dims
    # dim 2, top 3 labels: q0 (0) 0 1 0 | q1 (1) 1 0 1 | q2 (1) 0 0 1 | q3 (0) 0 1 0
    #   AP@3 = (sum of precision@i at the hits) / 3: 5/9, 5/9, (1/3)/3 = 1/9, 5/9   -> mAP 16/36 = 4/9
    #   precision@3: 2/3, 2/3, 1/3, 2/3 -> 7/12;  recall: hits / class size: 2/4, 2/2, 1/2, 2/4 -> 5/8
    assert out[2] == pytest.approx({"map": 4 / 9, "precision": 7 / 12, "recall": 5 / 8})
    # dim 3, top 3 labels: q0 0 1 0 | q1 1 0 0 | q2 0 0 1 | q3 0 0 1
    #   AP@3: 5/9, 1/3, 1/9, (1 + 1)/3 = 2/3 -> 15/36;  precision@3: 2/3, 1/3, 1/3, 2/3 -> 1/2
    #   recall: 2/4, 1/2, 1/2, 2/4 -> 1/2
    assert out[3] == pytest.approx({"map": 15 / 36, "precision": 1 / 2, "recall": 1 / 2})


def test_retrieval_recall_of_a_class_the_database_lacks(hand):
    q, ql, db, dbl = hand
    ql = torch.tensor([0, 1, 1, 7])  # q3's class is not in the database: no hits, recall 0 (not 0 / 0)
    out = metrics.retrieval_metrics(q, ql, db, dbl, dims=(2,), k=3)[2]
    assert out["recall"] == pytest.approx((2 / 4 + 2 / 2 + 1 / 2 + 0) / 4)
    assert out["map"] == pytest.approx((5 / 9 + 5 / 9 + 1 / 9 + 0) / 4)


@pytest.mark.parametrize("k, expected", [
    # 1-NN: q0 -> row 0 (0) right, q1 -> row 3 (1) right, q2 -> row 5 (0) wrong, q3 -> row 4 / row 5 (0) right
    (1, {2: 3 / 4, 3: 3 / 4}),
    # k = 2 ties (one vote each) go to the nearer neighbour: q1 at dim 2 has labels 1 0 -> 1 (right; the
    # smallest label would be 0, wrong); q2's 0 0 -> 0 (wrong)
    (2, {2: 3 / 4, 3: 3 / 4}),
    # k = 3 majority: dim 2 as 1-NN (0 1 0 -> 0, 1 0 1 -> 1, 0 0 1 -> 0, 0 1 0 -> 0); dim 3: q1's 1 0 0 -> 0 (wrong)
    (3, {2: 3 / 4, 3: 2 / 4}),
])
def test_knn_top1_by_hand(hand, k, expected):
    q, ql, db, dbl = hand
    assert metrics.knn_top1(db, dbl, q, ql, dims=[2, 3], k=k) == pytest.approx(expected)


def test_knn_top1_labels_any_integers_any_device_side(hand):
    q, ql, db, dbl = hand
    # Class ids are compared for equality only: shifting them all, or another integer dtype, changes nothing.
    out = metrics.knn_top1(db, (dbl - 5).to(torch.int16), q, (ql - 5).to(torch.int32), dims=[2, 3], k=3)
    assert out == pytest.approx({2: 3 / 4, 3: 2 / 4})


def test_adaptive_retrieval_by_hand(hand):
    q, ql, db, dbl = hand
    out = metrics.adaptive_retrieval(q, db, shortlist_dim=2, rerank_dim=3, shortlist=3, k=2,
                                     query_labels=ql, db_labels=dbl)
    # Shortlist 3 at dim 2, re-ranked at dim 3, keep 2: q0 {0 1 2} -> 0 1; q1 {3 2 1} -> 3 2; q2 {5 4 3} -> 5 4;
    # q3 {4 3 2} -> 4 3. Exact top 2 at D = 3: 0 1 | 3 2 | 5 4 | 5 4: q3 finds 1 of 2 -> recall (3 + 1/2) / 4.
    assert out["recall"] == pytest.approx(7 / 8)
    # MFLOPs: 6 rows x 2 dims + 3 shortlisted x 3 dims = 21 multiply-adds; exact: 6 x 3 = 18.
    assert out["mflops"] == pytest.approx(21e-6) and out["mflops_exact"] == pytest.approx(18e-6)
    assert out["speedup"] == pytest.approx(18 / 21)
    assert (out["dims"], out["shortlists"], out["k"]) == ((2, 3), (3,), 2)
    # Labels at k = 2: adaptive 0 1 | 1 0 | 0 0 | 0 1 against 0 | 1 | 1 | 0 -> AP 1/2, 1/2, 0, 1/2;
    # exact 0 1 | 1 0 | 0 0 | 0 0 -> AP 1/2, 1/2, 0, (1 + 1)/2 = 1.
    assert out["map"] == pytest.approx(3 / 8) and out["precision"] == pytest.approx(3 / 8)
    assert out["top1"] == pytest.approx(3 / 4)
    assert out["map_exact"] == pytest.approx(1 / 2) and out["precision_exact"] == pytest.approx(1 / 2)
    assert out["top1_exact"] == pytest.approx(3 / 4)


def test_funnel_retrieval_by_hand(hand):
    q, _, db, _ = hand
    out = metrics.funnel_retrieval(q, db, dims=(2, 2, 3), shortlists=(4, 3), k=2)
    # Top 4 at dim 2, re-ranked at dim 2 keeping 3 (the top 3 at dim 2), then at dim 3 keeping 2: the adaptive
    # search above. MFLOPs: 6 x 2 + 4 x 2 + 3 x 3 = 29 multiply-adds.
    assert out["recall"] == pytest.approx(7 / 8)
    assert out["mflops"] == pytest.approx(29e-6)
    assert "map" not in out  # no labels, no label metrics


def test_funnel_retrieval_defaults():
    g = torch.Generator().manual_seed(3)
    q, db = torch.randn(5, 80, generator=g), torch.randn(300, 80, generator=g)
    out = metrics.funnel_retrieval(q, db, k=10)
    # dims 16, 32, 64 (doubling below D) then D = 80; shortlists halve from 200: 200, 100, 50.
    assert out["dims"] == (16, 32, 64, 80) and out["shortlists"] == (200, 100, 50)
    assert out["mflops"] == pytest.approx((300 * 16 + 200 * 32 + 100 * 64 + 50 * 80) / 1e6)
    out = metrics.funnel_retrieval(q[:, :16], db[:100, :16], k=40)
    assert out["dims"] == (16,) and out["shortlists"] == () and out["recall"] == 1.0  # exact search


def test_search_mflops():
    # The paper's ImageNet-1K figures: exact search 1,281,167 x 2048 = 2,624 MFLOPs; 16 -> 2048 with 200 rows.
    assert metrics.search_mflops(1_281_167, (2048,), ()) == pytest.approx(2623.83, abs=0.01)
    assert metrics.search_mflops(1_281_167, (16, 2048), (200,)) == pytest.approx(20.4987 + 0.4096, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# Classification metrics by hand
# ----------------------------------------------------------------------------------------------
# Three examples, three classes, targets 0 0 2. Max softmax probability of [a, 0, 0] is e^a / (e^a + 2):
#   dim 2 logits [2,0,0] [0,1,0] [0,0,3]: confidence .787 .576 .909, predictions 0 1 2 (right, wrong, right)
#   dim 4 logits [0,5,0] [4,0,0] [0,0,1]: confidence .987 .965 .576, predictions 1 0 2 (wrong, right, right)
CASCADE_LOGITS = {4: torch.tensor([[0., 5, 0], [4, 0, 0], [0, 0, 1]]),
                  2: torch.tensor([[2., 0, 0], [0, 1, 0], [0, 0, 3]])}
CASCADE_TARGET = torch.tensor([0, 0, 2])


def test_adaptive_classification_by_hand():
    out = metrics.adaptive_classification(CASCADE_LOGITS, CASCADE_TARGET, thresholds=[0.5, 0.6, 0.8, 0.95, 0.0])
    assert [e["threshold"] for e in out] == [0.5, 0.6, 0.8, 0.95, 0.0]
    expected = [
        (2, 2 / 3),          # 0.5: all confident at dim 2
        (8 / 3, 1.0),        # 0.6: example 1 (.576) goes on to dim 4, where it is right: better than either dim
        (10 / 3, 2 / 3),     # 0.8: examples 0 (.787) and 1 go to dim 4
        (4, 2 / 3),          # 0.95: all answered at dim 4, the largest, even example 2 (.576 there)
        (2, 2 / 3),          # 0: the smallest dim answers all
    ]
    for entry, (dim, acc) in zip(out, expected):
        assert entry["expected_dim"] == pytest.approx(dim) and entry["accuracy"] == pytest.approx(acc)


def test_adaptive_classification_stops_at_equal_confidence():
    # Logits [50, 0]: softmax [1, e^-50] is exactly [1.0, ~0] in float32, so the threshold 1.0 is met (>=):
    # example 0 stops at dim 1 (right there, wrong at dim 2), example 1 (confidence .95 at dim 1) goes on.
    logits = {1: torch.tensor([[50., 0.], [0., 3.]]), 2: torch.tensor([[0., 9.], [0., 50.]])}
    (entry,) = metrics.adaptive_classification(logits, torch.tensor([0, 1]), thresholds=[1.0])
    assert entry == {"threshold": 1.0, "expected_dim": 1.5, "accuracy": 1.0}


def test_adaptive_classification_default_grid():
    out = metrics.adaptive_classification(CASCADE_LOGITS, CASCADE_TARGET)
    assert [e["threshold"] for e in out] == list(metrics.DEFAULT_THRESHOLDS)
    assert out[0]["expected_dim"] == 2 and out[-1]["expected_dim"] == 4  # thresholds 0 and 1


def test_linear_top1_by_hand():
    logits = dict(CASCADE_LOGITS)
    logits[8] = torch.tensor([[3., 0, 0], [2, 0, 0], [0, 1, 2]])  # all right
    assert metrics.linear_top1(logits, CASCADE_TARGET) == pytest.approx({4: 2 / 3, 2: 2 / 3, 8: 1.0})
    assert list(metrics.linear_top1(logits, CASCADE_TARGET)) == [4, 2, 8]


def test_nested_accuracy_by_hand():
    # Identity head; features [1, 3] and [2, 1], targets 1 0. At 1 dim the logits are [x0, 0]: both predict 0
    # (1 of 2 right); at 2 dims [1, 3] -> 1 and [2, 1] -> 0: both right.
    features = torch.tensor([[1., 3.], [2., 1.]])
    assert metrics.nested_accuracy(features, torch.eye(2), torch.tensor([1, 0]), (1, 2)) == [0.5, 1.0]


# ----------------------------------------------------------------------------------------------
# Against a float64 brute force on random data at odd sizes
# ----------------------------------------------------------------------------------------------

def _cosine_ranking(q: np.ndarray, db: np.ndarray, dim: int) -> np.ndarray:
    """[Q, N] database ids by descending cosine on the first `dim` dims (float64)."""
    qn = q[:, :dim] / np.linalg.norm(q[:, :dim], axis=1, keepdims=True)
    dn = db[:, :dim] / np.linalg.norm(db[:, :dim], axis=1, keepdims=True)
    return np.argsort(-(qn @ dn.T), axis=1, kind="stable")


def _paper_metrics(val_classes, db_classes, neighbors, k):
    """The paper's compute_mAP_recall_at_k (retrieval/compute_metrics.ipynb), its constant 1300 replaced by
    the query's class size in the database."""
    aps, precision, recall = [], [], []
    for i in range(val_classes.shape[0]):
        matches = db_classes[neighbors[i, :k]] == val_classes[i]
        precs = np.cumsum(matches).astype(float) / np.arange(1, k + 1)
        aps.append(np.sum(precs[matches]) / k)
        precision.append(np.sum(matches) / k)
        recall.append(np.sum(matches) / max(1, np.sum(db_classes == val_classes[i])))
    return {"map": np.mean(aps), "precision": np.mean(precision), "recall": np.mean(recall)}


def _random_labelled(n_queries=17, n_rows=53, dim=19, n_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    q, db = rng.standard_normal((n_queries, dim)), rng.standard_normal((n_rows, dim))
    ql = rng.integers(0, n_classes + 1, n_queries)  # class n_classes may be absent from the database
    dbl = rng.choice(n_classes, n_rows, p=[0.4, 0.3, 0.2, 0.1])  # unequal class sizes
    return q, ql, db, dbl


@pytest.fixture(params=[False, True], ids=["direct", "chunked"])
def search_path(request, monkeypatch):
    """Both paths of the torch search: the whole score matrix, and bounded blocks merged (what a
    60,000 x 10,000 search takes; forced here by tiny budgets)."""
    if request.param:
        monkeypatch.setattr(search_torch, "SCORE_CHUNK_BYTES", 2 << 10)
        monkeypatch.setattr(search_torch, "CPU_BLOCK", 512)
        monkeypatch.setattr(search_torch, "DIRECT_BYTES", 0)


@pytest.mark.parametrize("k", [1, 4, 7])
def test_knn_top1_brute_force(search_path, k):
    q, ql, db, dbl = _random_labelled()
    dims = (19, 3, 8)
    out = metrics.knn_top1(torch.from_numpy(db), torch.from_numpy(dbl), torch.from_numpy(q), torch.from_numpy(ql),
                           dims, k=k)
    for m in dims:
        ranking = _cosine_ranking(q, db, m)
        right = 0
        for i in range(q.shape[0]):
            labels = [int(x) for x in dbl[ranking[i, :k]]]
            counts = Counter(labels)
            vote = next(lab for lab in labels if counts[lab] == max(counts.values()))  # tie: nearest first
            right += vote == ql[i]
        assert out[m] == pytest.approx(right / q.shape[0]), m


@pytest.mark.parametrize("k", [1, 5, 11])
def test_retrieval_metrics_brute_force(search_path, k):
    q, ql, db, dbl = _random_labelled(seed=1)
    dims = (5, 19, 2)
    out = metrics.retrieval_metrics(torch.from_numpy(q).float(), torch.from_numpy(ql), torch.from_numpy(db).float(),
                                    torch.from_numpy(dbl), dims, k=k)
    for m in dims:
        assert out[m] == pytest.approx(_paper_metrics(ql, dbl, _cosine_ranking(q, db, m), k), abs=1e-12), m


def test_adaptive_classification_brute_force():
    g = torch.Generator().manual_seed(2)
    dims, n, c = (13, 3, 7, 29), 41, 5
    logits = {m: torch.randn(n, c, generator=g, dtype=torch.float64) * (1 + m / 10) for m in dims}
    target = torch.randint(0, c, (n,), generator=g)
    thresholds = [0.0, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0]
    out = metrics.adaptive_classification(logits, target, thresholds)
    for t, entry in zip(thresholds, out):
        used, right = [], 0
        for i in range(n):
            for m in sorted(dims):
                p = torch.softmax(logits[m][i], 0)
                if p.max() >= t or m == max(dims):
                    used.append(m)
                    right += int(p.argmax() == target[i])
                    break
        assert entry["expected_dim"] == pytest.approx(sum(used) / n)
        assert entry["accuracy"] == pytest.approx(right / n)


def _funnel_ids(q, db, dims, shortlists, k):
    """The paper's reranking.ipynb, generalised: top shortlists[0] at dims[0], each later stage re-orders the
    previous shortlist at its dim and keeps the next size (k at the end)."""
    ids = _cosine_ranking(q, db, dims[0])[:, :shortlists[0]]
    for m, keep in zip(dims[1:], list(shortlists[1:]) + [k]):
        for i in range(q.shape[0]):
            order = _cosine_ranking(q[i:i + 1], db[ids[i]], m)[0]
            ids[i, :len(order)] = ids[i][order]
        ids = ids[:, :keep]
    return ids


@pytest.mark.parametrize("dims, shortlists, k", [((3, 19), (23,), 5), ((2, 5, 11, 19), (31, 17, 9), 4)])
def test_funnel_and_adaptive_retrieval_brute_force(dims, shortlists, k):
    q, ql, db, dbl = _random_labelled(seed=4)
    q32, db32 = q.astype(np.float32), db.astype(np.float32)  # the index stores float32: brute-force those values
    args = (torch.from_numpy(q32), torch.from_numpy(db32))
    labels = dict(query_labels=torch.from_numpy(ql), db_labels=torch.from_numpy(dbl))
    if len(dims) == 2:
        out = metrics.adaptive_retrieval(*args, shortlist_dim=dims[0], rerank_dim=None, shortlist=shortlists[0],
                                         k=k, **labels)
    else:
        out = metrics.funnel_retrieval(*args, dims=dims, shortlists=shortlists, k=k, **labels)
    q64, db64 = q32.astype(np.float64), db32.astype(np.float64)
    ids = _funnel_ids(q64, db64, dims, shortlists, k)
    exact = _cosine_ranking(q64, db64, 19)[:, :k]
    assert out["recall"] == pytest.approx(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact)]))
    for suffix, found in (("", ids), ("_exact", exact)):
        paper = _paper_metrics(ql, dbl, found, k)
        assert out["map" + suffix] == pytest.approx(paper["map"])
        assert out["precision" + suffix] == pytest.approx(paper["precision"])
        assert out["top1" + suffix] == pytest.approx(np.mean(dbl[found[:, 0]] == ql))
    n_rows = db.shape[0]
    expected = n_rows * dims[0] + sum(s * m for s, m in zip(shortlists, dims[1:]))
    assert out["mflops"] == pytest.approx(expected / 1e6) and out["mflops_exact"] == pytest.approx(n_rows * 19 / 1e6)


# ----------------------------------------------------------------------------------------------
# Argument errors
# ----------------------------------------------------------------------------------------------

def _bad_calls():
    q, ql, db, dbl = (_unit_rows(Q_ANGLES, (1,) * 4), torch.tensor(Q_LABELS),
                      _unit_rows(DB_ANGLES, DB_THIRD), torch.tensor(DB_LABELS))
    nan_q = q.clone()
    nan_q[1, 2] = float("nan")
    return [
        (lambda: metrics.knn_top1(db, dbl, q, ql, dims=(4,)), ValueError, r"dims\[0\] must be in \[1, 3\]"),
        (lambda: metrics.knn_top1(db, dbl, q, ql, dims=(2, 2)), ValueError, "repeated"),
        (lambda: metrics.knn_top1(db, dbl, q, ql, dims=(2,), k=7), ValueError, r"k must be in \[1, 6\]"),
        (lambda: metrics.knn_top1(db, dbl[:5], q, ql, dims=(2,)), ValueError, r"train_labels must have shape \[6\]"),
        (lambda: metrics.knn_top1(db, dbl.float(), q, ql, dims=(2,)), TypeError, "train_labels must have dtype"),
        (lambda: metrics.knn_top1(db, dbl, q[:, :2], ql, dims=(2,)), ValueError, "test_emb has 2 dims but train_emb"),
        (lambda: metrics.knn_top1(db, dbl, q.double(), ql, dims=(2,)), TypeError, "test_emb has dtype"),
        (lambda: metrics.knn_top1(db.numpy(), dbl, q, ql, dims=(2,)), TypeError, "train_emb must be a torch.Tensor"),
        (lambda: metrics.knn_top1(db, dbl, nan_q, ql, dims=(2,)), ValueError, "test_emb contains NaN"),
        (lambda: metrics.retrieval_metrics(q, ql, db, dbl, dims=(2,), k=0), ValueError, "k must be in"),
        (lambda: metrics.retrieval_metrics(q, ql[:3], db, dbl, dims=(2,), k=3), ValueError,
         "query_labels must have shape"),
        (lambda: metrics.retrieval_metrics(q[0], ql, db, dbl, dims=(2,), k=3), ValueError, "query_emb must be 2-D"),
        (lambda: metrics.linear_top1({}, ql), TypeError, "logits_by_dim must be a non-empty dict"),
        (lambda: metrics.linear_top1({2: q, 3: q[:, :2]}, torch.tensor([0, 1, 1, 0])), ValueError,
         r"logits_by_dim\[3\] has shape"),
        (lambda: metrics.linear_top1({2: q}, torch.tensor([0, 1, 3, 0])), ValueError, "target has entry 3"),
        (lambda: metrics.linear_top1({0: q}, ql), ValueError, r"logits_by_dim keys\[0\] must be"),
        (lambda: metrics.adaptive_classification({2: q}, ql, thresholds=[0.5, 1.5]), ValueError,
         r"thresholds\[1\] must be in \[0.0, 1.0\]"),
        (lambda: metrics.adaptive_classification({2: q}, ql, thresholds=[]), TypeError, "thresholds must be"),
        (lambda: metrics.adaptive_retrieval(q, db, shortlist_dim=2, shortlist=7, k=2), ValueError,
         r"shortlist must be in \[2, 6\]"),
        (lambda: metrics.adaptive_retrieval(q, db, shortlist_dim=3, rerank_dim=2, shortlist=4, k=2), ValueError,
         "rerank_dim must be >= shortlist_dim"),
        (lambda: metrics.adaptive_retrieval(q, db, shortlist_dim=2, shortlist=4, k=2, query_labels=ql), ValueError,
         "pass both query_labels and db_labels"),
        (lambda: metrics.adaptive_retrieval(q, db, shortlist_dim=2, shortlist=4, k=2, metric="dot"), ValueError,
         "metric must be one of"),
        (lambda: metrics.funnel_retrieval(q, db, dims=(2, 3), shortlists=(4, 3), k=2), ValueError,
         "shortlists must have len"),
        (lambda: metrics.funnel_retrieval(q, db, dims=(3, 2), shortlists=(4,), k=2), ValueError, "non-decreasing"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_argument_errors(case):
    call, exc, match = _bad_calls()[case]
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def _assert_png(path, expected):
    assert path == str(expected)
    data = expected.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_write_png(tmp_path, hand):
    q, ql, db, dbl = hand
    target = tmp_path / "new folder" / "acc.png"  # the folder is created
    out = plots.plot_accuracy_vs_dim({"MRL": {8: 0.5, 16: 0.6, 2048: 0.76}, "FF": {8: 0.4, 2048: 0.76}}, target,
                                     title="top-1", ylabel="accuracy")
    _assert_png(out, target)

    curves = {"cascade": metrics.adaptive_classification(CASCADE_LOGITS, CASCADE_TARGET),
              "fixed": [{"expected_dim": m, "accuracy": a}
                        for m, a in metrics.linear_top1(CASCADE_LOGITS, CASCADE_TARGET).items()]}
    _assert_png(plots.plot_adaptive_classification(curves, tmp_path / "cls.png"), tmp_path / "cls.png")

    points = [metrics.adaptive_retrieval(q, db, shortlist_dim=2, shortlist=3, k=2, query_labels=ql, db_labels=dbl),
              metrics.funnel_retrieval(q, db, dims=(2, 2, 3), shortlists=(4, 3), k=2, query_labels=ql,
                                       db_labels=dbl)]
    _assert_png(plots.plot_adaptive_retrieval(points, tmp_path / "ret.png"), tmp_path / "ret.png")
    _assert_png(plots.plot_adaptive_retrieval(points, tmp_path / "rec.png", y="recall"), tmp_path / "rec.png")


@pytest.mark.parametrize("call, exc, match", [
    (lambda p: plots.plot_accuracy_vs_dim({}, p), TypeError, "results must be a non-empty dict"),
    (lambda p: plots.plot_accuracy_vs_dim({"MRL": []}, p), TypeError, r"results\['MRL'\] must be"),
    (lambda p: plots.plot_accuracy_vs_dim({"MRL": {8: 0.5}}, None), TypeError, "path must be"),
    (lambda p: plots.plot_adaptive_classification({"c": [{"accuracy": 1.0}]}, p), ValueError, "expected_dim"),
    (lambda p: plots.plot_adaptive_classification({"c": [{"expected_dim": 0, "accuracy": 1.0}]}, p), ValueError,
     r"curves\['c'\]\[0\]\['expected_dim'\] must be > 0"),
    (lambda p: plots.plot_adaptive_retrieval([], p), TypeError, "points must be a non-empty list"),
    (lambda p: plots.plot_adaptive_retrieval([{"mflops": 1.0, "recall": 1.0}], p, y="map"), ValueError,
     r"points\[0\] lacks the key\(s\) \['map'\]"),
])
def test_plot_argument_errors(tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
