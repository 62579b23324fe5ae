"""Tests of mrl_kernels.reference against independent float64 computations.

The oracles here avoid the functions the reference uses: logits are broadcast-multiply-sums (no
F.linear), cross-entropy is an explicit max-shifted log-sum-exp (no F.cross_entropy), norms are
explicit square roots (no F.normalize), and rankings come from numpy argsort (no torch.topk).
"""
import numpy as np
import pytest
import torch

from mrl_kernels import reference as ref

N, C, D = 37, 101, 70
DIMS = [(3, 17, 70), (17, 3, 70)]
F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(tuple(shape), generator=g, dtype=F64)


def _close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64),
                               rtol=rtol, atol=atol, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Independent oracles (torch float64, explicit formulas, differentiable)
# ---------------------------------------------------------------------------------------------

def _lse(z, dim):
    zmax = z.max(dim=dim, keepdim=True).values.detach()
    return (zmax + torch.log(torch.exp(z - zmax).sum(dim=dim, keepdim=True))).squeeze(dim)


def _oracle_logits(x, weight, bias, j, m):
    if isinstance(weight, torch.Tensor):
        w, b = weight[:, :m], bias
    else:
        w, b = weight[j], (None if bias is None else bias[j])
    z = (x[:, None, :m] * w[None, :, :]).sum(-1)
    return z if b is None else z + b


def _oracle_ce_rows(z, t, ignore_index, eps):
    """Per-row CE with label smoothing; ignored rows 0. Returns (rows, valid mask)."""
    valid = t != ignore_index
    tt = torch.where(valid, t, torch.zeros_like(t))
    logp = z - _lse(z, 1)[:, None]
    nll = -logp[torch.arange(z.shape[0]), tt]
    smooth = -logp.mean(1)
    rows = (1 - eps) * nll + eps * smooth
    return torch.where(valid, rows, torch.zeros_like(rows)), valid


def _oracle_reduce(rows, count, reduction):
    if reduction == "mean":
        return rows.sum() / count
    if reduction == "sum":
        return rows.sum()
    return rows


def _weights(dim_weights, n):
    return [1.0] * n if dim_weights is None else [float(w) for w in dim_weights]


def _oracle_ce(x, weight, t, dims, bias=None, dim_weights=None, ignore_index=-100, eps=0.0,
               reduction="mean"):
    per_dim = []
    for j, m in enumerate(dims):
        rows, valid = _oracle_ce_rows(_oracle_logits(x, weight, bias, j, m), t, ignore_index, eps)
        per_dim.append(_oracle_reduce(rows, valid.sum(), reduction))
    w = _weights(dim_weights, len(dims))
    total = per_dim[0] * w[0]
    for wj, lj in zip(w[1:], per_dim[1:]):
        total = total + wj * lj
    return total, per_dim


def _oracle_contrastive(q, d, dims, temperature, labels, normalize, symmetric, dim_weights,
                        reduction):
    B = q.shape[0]
    labels = torch.arange(B) if labels is None else labels
    rows = torch.arange(B)
    per_dim = []
    for m in dims:
        qm, dm = q[:, :m], d[:, :m]
        if normalize:
            qm = qm / torch.sqrt((qm * qm).sum(1, keepdim=True)).clamp_min(1e-12)
            dm = dm / torch.sqrt((dm * dm).sum(1, keepdim=True)).clamp_min(1e-12)
        s = (qm[:, None, :] * dm[None, :, :]).sum(-1) / temperature       # [B, M]
        pos = s[rows, labels]
        loss = _lse(s, 1) - pos
        if symmetric:
            loss = (loss + (_lse(s[:, labels], 0) - pos)) / 2               # column of doc labels[i]
        per_dim.append(_oracle_reduce(loss, B, reduction))
    w = _weights(dim_weights, len(dims))
    total = per_dim[0] * w[0]
    for wj, lj in zip(w[1:], per_dim[1:]):
        total = total + wj * lj
    return total, per_dim


def _make_head(g, kind, dims, with_bias):
    if kind == "shared":
        return _randn(g, C, D) * 0.3, (_randn(g, C) if with_bias else None)
    weight = [_randn(g, C, m) * 0.3 for m in dims]
    if not with_bias:
        return weight, None
    bias = [_randn(g, C) for _ in dims]
    bias[1] = None  # a sequence may mix tensors and None
    return weight, bias


def _targets(g, ignore_index, n_ignored=6):
    t = torch.randint(0, C, (N,), generator=g)
    t[torch.randperm(N, generator=g)[:n_ignored]] = ignore_index
    return t


# ---------------------------------------------------------------------------------------------
# nested_logits / nested_cross_entropy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("kind", ["shared", "separate"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_nested_logits(dims, kind, with_bias):
    g = _gen(1)
    x = _randn(g, N, D)
    weight, bias = _make_head(g, kind, dims, with_bias)
    out = ref.nested_logits(x, weight, dims, bias)
    assert isinstance(out, tuple) and len(out) == len(dims)
    for j, m in enumerate(dims):
        assert out[j].shape == (N, C) and out[j].dtype == F64
        _close(out[j], _oracle_logits(x, weight, bias, j, m))


CE_CASES = [  # (ignore_index, label_smoothing, dim_weights)
    (-100, 0.0, None),
    (5, 0.1, [0.5, 2.0, 1.25]),
    (-100, 0.1, torch.tensor([1.0, 0.25, 3.0])),
]


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("kind", ["shared", "separate"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", range(len(CE_CASES)))
def test_nested_cross_entropy(dims, kind, with_bias, reduction, case):
    ignore_index, eps, dim_weights = CE_CASES[case]
    g = _gen(100 + case)
    x = _randn(g, N, D)
    weight, bias = _make_head(g, kind, dims, with_bias)
    t = _targets(g, ignore_index)
    kwargs = dict(bias=bias, dim_weights=dim_weights, label_smoothing=eps, reduction=reduction)
    if ignore_index != -100:
        kwargs["ignore_index"] = ignore_index
    total = ref.nested_cross_entropy(x, weight, t, dims, **kwargs)
    want, want_per_dim = _oracle_ce(x, weight, t, dims, bias, dim_weights, ignore_index, eps,
                                    reduction)
    assert total.shape == (() if reduction != "none" else (N,))
    _close(total, want)
    if reduction == "none":
        assert torch.all(total[t == ignore_index] == 0)

    total2, per_dim = ref.nested_cross_entropy(x, weight, t, dims, return_per_dim=True, **kwargs)
    _close(total2, want)
    assert per_dim.shape == ((len(dims),) if reduction != "none" else (N, len(dims)))
    _close(per_dim, torch.stack(want_per_dim, dim=-1))


def test_nested_cross_entropy_per_dim_is_detached_and_unweighted():
    g = _gen(7)
    x = _randn(g, N, D).requires_grad_()
    weight = _randn(g, C, D).requires_grad_()
    t = _targets(g, -100)
    dims = (17, 3, 70)
    total, per_dim = ref.nested_cross_entropy(x, weight, t, dims, dim_weights=[2.0, 3.0, 4.0],
                                              return_per_dim=True)
    assert total.requires_grad and not per_dim.requires_grad
    unweighted = ref.nested_cross_entropy(x, weight, t, dims)
    _close(per_dim.sum(), unweighted.detach())
    _close(total.detach(), (per_dim * torch.tensor([2.0, 3.0, 4.0], dtype=F64)).sum())


def test_nested_cross_entropy_all_ignored():
    g = _gen(8)
    x = _randn(g, N, D)
    weight = _randn(g, C, D)
    t = torch.full((N,), -100)
    assert torch.isnan(ref.nested_cross_entropy(x, weight, t, (3, 70)))  # like torch: 0 / 0
    assert ref.nested_cross_entropy(x, weight, t, (3, 70), reduction="sum") == 0
    none = ref.nested_cross_entropy(x, weight, t, (3, 70), reduction="none", label_smoothing=0.1)
    assert none.shape == (N,) and torch.all(none == 0)


@pytest.mark.parametrize("kind", ["shared", "separate"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nested_cross_entropy_gradients(kind, reduction):
    g = _gen(9)
    dims = (17, 3, 70)
    x = _randn(g, N, D).requires_grad_()
    weight, bias = _make_head(g, kind, dims, True)
    if kind == "shared":
        weight.requires_grad_()
        bias.requires_grad_()
        params = [x, weight, bias]
    else:
        for w in weight:
            w.requires_grad_()
        for b in bias:
            if b is not None:
                b.requires_grad_()
        params = [x, *weight, *[b for b in bias if b is not None]]
    t = _targets(g, 5)
    kw = dict(dim_weights=[0.5, 2.0, 1.0], ignore_index=5, reduction=reduction)
    got = ref.nested_cross_entropy(x, weight, t, dims, bias=bias, label_smoothing=0.1, **kw)
    want, _ = _oracle_ce(x, weight, t, dims, bias, kw["dim_weights"], 5, 0.1, reduction)
    upstream = _randn(g, *got.shape)  # a random cotangent also checks the "none" rows
    g_got = torch.autograd.grad(got, params, upstream)
    g_want = torch.autograd.grad(want, params, upstream)
    for a, b in zip(g_got, g_want):
        _close(a, b)
    assert x.grad is None  # autograd.grad does not accumulate


# ---------------------------------------------------------------------------------------------
# nested_contrastive_loss
# ---------------------------------------------------------------------------------------------

B = 13


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("M", [B, 29])
@pytest.mark.parametrize("custom_labels", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nested_contrastive_loss(dims, M, custom_labels, normalize, symmetric, reduction):
    g = _gen(200 + M)
    q, d = _randn(g, B, D), _randn(g, M, D)
    labels = torch.randperm(M, generator=g)[:B] if custom_labels else None
    temperature = 0.05 if normalize else 3.0
    dim_weights = [1.5, 0.5, 1.0]
    kw = dict(temperature=temperature, labels=labels, normalize=normalize, symmetric=symmetric,
              dim_weights=dim_weights, reduction=reduction)
    total, per_dim = ref.nested_contrastive_loss(q, d, dims, return_per_dim=True, **kw)
    want, want_per_dim = _oracle_contrastive(q, d, dims, temperature, labels, normalize, symmetric,
                                             dim_weights, reduction)
    assert total.shape == (() if reduction != "none" else (B,))
    _close(total, want)
    assert per_dim.shape == ((len(dims),) if reduction != "none" else (B, len(dims)))
    assert not per_dim.requires_grad
    _close(per_dim, torch.stack(want_per_dim, dim=-1))
    _close(ref.nested_contrastive_loss(q, d, dims, **kw), want)


def test_nested_contrastive_loss_defaults():
    g = _gen(11)
    q, d = _randn(g, B, D), _randn(g, B + 4, D)
    want, _ = _oracle_contrastive(q, d, (3, 17, 70), 0.05, None, True, False, None, "mean")
    _close(ref.nested_contrastive_loss(q, d, (3, 17, 70)), want)


@pytest.mark.parametrize("symmetric", [False, True])
def test_nested_contrastive_loss_gradients(symmetric):
    g = _gen(12)
    q = _randn(g, B, D).requires_grad_()
    d = _randn(g, 21, D).requires_grad_()
    labels = torch.randperm(21, generator=g)[:B]
    dims = (17, 3, 70)
    got = ref.nested_contrastive_loss(q, d, dims, 0.1, labels, symmetric=symmetric,
                                      dim_weights=[1.0, 0.5, 2.0])
    want, _ = _oracle_contrastive(q, d, dims, 0.1, labels, True, symmetric, [1.0, 0.5, 2.0],
                                  "mean")
    for a, b in zip(torch.autograd.grad(got, [q, d]), torch.autograd.grad(want, [q, d])):
        _close(a, b)


# ---------------------------------------------------------------------------------------------
# prefix_norms / prefix_scores / prefix_topk / rerank / funnel / adaptive
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", DIMS + [(1,), (70, 1)])
def test_prefix_norms(dims):
    x = _randn(_gen(13), N, D)
    out = ref.prefix_norms(x, dims)
    assert out.shape == (N, len(dims))
    xn = x.numpy()
    want = np.array([[np.sqrt(sum(v * v for v in row[:m])) for m in dims] for row in xn])
    _close(out, want)


METRICS = ["ip", "cosine", "l2"]


def _np_scores(q, x, dim, metric):
    """[Q, N] scores on the first dim dims (None = all), computed directly in numpy."""
    q, x = q.numpy()[:, :dim], x.numpy()[:, :dim]
    if metric == "l2":
        return ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if metric == "cosine":
        q = q / np.maximum(np.sqrt((q * q).sum(1, keepdims=True)), 1e-12)
        x = x / np.maximum(np.sqrt((x * x).sum(1, keepdims=True)), 1e-12)
    return q @ x.T


def _np_order(scores, metric):
    """Column order best first, per row."""
    return np.argsort(scores if metric == "l2" else -scores, axis=1, kind="stable")


def _check_ranked(scores, ids, full, want_ids, metric, exact_ids=True):
    """scores/ids [Q, k] against the full oracle score matrix and the oracle's ranked ids."""
    k = want_ids.shape[1]
    assert scores.shape == ids.shape == (full.shape[0], k)
    assert ids.dtype == torch.int64
    ids_np = ids.numpy()
    for row in ids_np:
        assert len(set(row.tolist())) == k
    _close(scores, np.take_along_axis(full, ids_np, 1))          # scores belong to the ids
    _close(scores, np.take_along_axis(full, want_ids, 1))        # and are the best k, in order
    if exact_ids:
        np.testing.assert_array_equal(ids_np, want_ids)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", [1, 17, None, D])
def test_prefix_scores(metric, dim):
    g = _gen(14)
    q, x = _randn(g, 5, D), _randn(g, N, D)
    out = ref.prefix_scores(q, x, dim, metric)
    assert out.shape == (5, N)
    _close(out, _np_scores(q, x, dim, metric))


def test_prefix_scores_cosine_zero_rows():
    g = _gen(15)
    q, x = _randn(g, 4, D), _randn(g, N, D)
    q[1, :] = 0
    x[3, :5] = 0  # zero prefix only
    out = ref.prefix_scores(q, x, 5, "cosine")
    assert torch.all(out[1] == 0) and torch.all(out[:, 3] == 0)
    _close(out, _np_scores(q, x, 5, "cosine"))
    assert torch.isfinite(ref.prefix_scores(q, x, None, "cosine")).all()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 7, N])
@pytest.mark.parametrize("dim", [1, 17, None, D])
@pytest.mark.parametrize("Q", [1, 5])
def test_prefix_topk(metric, k, dim, Q):
    g = _gen(16)
    q, x = _randn(g, Q, D), _randn(g, N, D)
    scores, ids = ref.prefix_topk(q, x, k, dim, metric)
    full = _np_scores(q, x, dim, metric)
    # cosine on one dim is +-1 for every row: all ties, so only the scores are determined
    _check_ranked(scores, ids, full, _np_order(full, metric)[:, :k], metric,
                  exact_ids=not (metric == "cosine" and dim == 1))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 7, 40])
@pytest.mark.parametrize("dim", [5, None])
def test_rerank(metric, k, dim):
    g = _gen(17)
    Q, NB, S = 5, 300, 40
    q, x = _randn(g, Q, D), _randn(g, NB, D)
    cand = torch.stack([torch.randperm(NB, generator=g)[:S] for _ in range(Q)])
    scores, ids = ref.rerank(q, x, cand, k, dim, metric)
    full = _np_scores(q, x, dim, metric)
    c = cand.numpy()
    want = np.take_along_axis(c, _np_order(np.take_along_axis(full, c, 1), metric)[:, :k], 1)
    _check_ranked(scores, ids, full, want, metric)


def _np_funnel(q, x, k, dims, shortlists, metric):
    """The funnel, one query at a time: keep shortlists[i] (then k) best at dims[i]."""
    out = []
    for i in range(q.shape[0]):
        cand = np.arange(x.shape[0])
        for dim, keep in zip(dims, list(shortlists) + [k]):
            s = _np_scores(q[i:i + 1], x, dim, metric)[0, cand]
            cand = cand[_np_order(s[None], metric)[0, :keep]]
        out.append(cand)
    return np.stack(out)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dims,shortlists", [
    ((3, 8, 17, 40, 70), (200, 100, 50, 25)),    # the paper's funnel shape, scaled down
    ((5, 70), (60,)),
    ((70,), ()),                                  # one stage: plain top-k
])
def test_funnel_search(metric, dims, shortlists):
    g = _gen(18)
    q, x = _randn(g, 4, D), _randn(g, 300, D)
    k = 7
    scores, ids = ref.funnel_search(q, x, k, dims, shortlists, metric)
    want = _np_funnel(q, x, k, dims, shortlists, metric)
    _check_ranked(scores, ids, _np_scores(q, x, dims[-1], metric), want, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("rerank_dim", [None, 40])
def test_adaptive_search(metric, rerank_dim):
    g = _gen(19)
    q, x = _randn(g, 4, D), _randn(g, 300, D)
    k = 7
    scores, ids = ref.adaptive_search(q, x, k, shortlist=30, shortlist_dim=8,
                                      rerank_dim=rerank_dim, metric=metric)
    full_dim = D if rerank_dim is None else rerank_dim
    want = _np_funnel(q, x, k, (8, full_dim), (30,), metric)
    _check_ranked(scores, ids, _np_scores(q, x, full_dim, metric), want, metric)
    # default arguments: shortlist 200 at 16 dims, re-rank at all D
    s2, i2 = ref.adaptive_search(q, x, k, metric=metric)
    want2 = _np_funnel(q, x, k, (16, D), (200,), metric)
    _check_ranked(s2, i2, _np_scores(q, x, D, metric), want2, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_adaptive_search_full_shortlist_is_exact(metric):
    g = _gen(20)
    q, x = _randn(g, 6, D), _randn(g, N, D)
    s, i = ref.adaptive_search(q, x, 7, shortlist=N, shortlist_dim=3, rerank_dim=50,
                               metric=metric)
    s_exact, i_exact = ref.prefix_topk(q, x, 7, 50, metric)
    torch.testing.assert_close(i, i_exact, rtol=0, atol=0)
    _close(s, s_exact)
    full = _np_scores(q, x, 50, metric)
    _check_ranked(s, i, full, _np_order(full, metric)[:, :7], metric)


def test_prefix_scores_l2_is_never_negative():
    g = _gen(21)
    x = _randn(g, N, D) * 1e3
    out = ref.prefix_scores(x, x, None, "l2")  # |q|^2 + |x|^2 - 2 q.x cancels on the diagonal
    assert torch.all(out >= 0)
    _close(torch.diagonal(out), torch.zeros(N, dtype=F64), atol=1e-6)
    _close(out, _np_scores(x, x, None, "l2"), rtol=1e-9, atol=1e-6)
