"""The chunked torch path of the nested contrastive loss (ops/contrastive_torch.py) against the float64 eager
reference: losses and gradients for queries and docs, through the per-prefix normalisation."""
import pytest
import torch
from helpers import TOL, rel_error

import mrl_kernels as mk
from mrl_kernels import reference
from mrl_kernels.ops import contrastive_torch

B, D = 37, 70


def inputs(dtype, n_docs=B, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, generator=g).to(dtype)
    docs = (torch.randn(n_docs, d, generator=g) + 0.5 * torch.cat([q.float(), torch.zeros(n_docs - B, d)])).to(dtype)
    return q.requires_grad_(), docs.requires_grad_()


def check(dtype, dims, n_docs=B, labels=None, **options):
    q, docs = inputs(dtype, n_docs)
    out = mk.matryoshka_contrastive_loss(q, docs, dims, labels=labels, backend="torch", **options)
    q64, d64 = (t.detach().double().requires_grad_() for t in (q, docs))
    ref = reference.nested_contrastive_loss(q64, d64, dims, labels=labels, **options)
    if options.get("return_per_dim"):
        (out, per_dim), (ref, ref_per_dim) = out, ref
        assert per_dim.shape == ref_per_dim.shape and rel_error(per_dim, ref_per_dim) < TOL[dtype]
    assert out.dtype == dtype and out.shape == ref.shape and rel_error(out, ref) < TOL[dtype]
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * upstream).sum(), (q, docs))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q64, d64))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and rel_error(g, r) < TOL[dtype] * 2


@pytest.fixture(params=["one_chunk", "chunks"])
def chunking(request, monkeypatch):
    """One row chunk, or chunks of 5 rows (37 queries: a ragged last chunk)."""
    if request.param == "chunks":
        monkeypatch.setattr(contrastive_torch, "row_chunk", lambda n_docs, n_dims: 5)


@pytest.mark.parametrize("dims", [(3, 17, 70), (17, 3, 70), (70,), (1, 2)])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_matches_float64(chunking, dims, normalize, symmetric):
    check(torch.float32, dims, normalize=normalize, symmetric=symmetric, temperature=0.07 if normalize else 20.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_cold_cosine_shifts_by_row_maxima(chunking, reduction, symmetric):
    """1/temperature above MAX_UNSHIFTED_LOGIT: exp(Z) could overflow, so rows are shifted by their maxima and
    the column log-sum-exps merged across chunks."""
    check(torch.float32, (3, 17, 70), symmetric=symmetric, temperature=0.01, reduction=reduction)


@pytest.mark.parametrize("options", [dict(reduction="sum"), dict(reduction="none"),
                                     dict(reduction="none", return_per_dim=True),
                                     dict(return_per_dim=True, dim_weights=[0.5, 2.0, 1.0])],
                         ids=["sum", "none", "none-per_dim", "weights"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_options(chunking, options, symmetric):
    check(torch.float32, (17, 3, 70), symmetric=symmetric, **options)


@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_extra_negatives_and_labels(chunking, symmetric):
    """More docs than queries (the rest are negatives) and permuted labels into them."""
    labels = torch.randperm(B + 11, generator=torch.Generator().manual_seed(3))[:B]
    check(torch.float32, (17, 3, 70), n_docs=B + 11, labels=labels, symmetric=symmetric)
    check(torch.float32, (17, 3, 70), n_docs=B + 11, symmetric=symmetric)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit(chunking, dtype):
    check(dtype, (17, 3, 70), symmetric=True)


def test_zero_prefix_has_the_reference_gradient():
    """A query whose first 17 features are zero: its 3- and 17-prefix norms are clamped at eps (F.normalize),
    where the gradient through the norm vanishes."""
    q, docs = inputs(torch.float64)
    with torch.no_grad():
        q[4, :17] = 0
    out = mk.matryoshka_contrastive_loss(q, docs, (3, 17, 70), backend="torch", symmetric=True)
    q64, d64 = (t.detach().clone().requires_grad_() for t in (q, docs))
    ref = reference.nested_contrastive_loss(q64, d64, (3, 17, 70), symmetric=True)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out, (q, docs)), torch.autograd.grad(ref, (q64, d64))):
        torch.testing.assert_close(g, r)


def test_nan_propagates():
    q, docs = inputs(torch.float32)
    with torch.no_grad():
        docs[2, 5] = float("nan")
    assert mk.matryoshka_contrastive_loss(q, docs, (3, 17, 70), backend="torch").isnan()


def test_auto_takes_the_chunked_path(monkeypatch):
    calls = []
    for name in ("nested_contrastive_rows_torch", "nested_contrastive_total_torch"):
        fn = getattr(contrastive_torch, name)
        monkeypatch.setattr(f"mrl_kernels.ops.contrastive.{name}",
                            lambda *args, fn=fn, name=name: calls.append(name) or fn(*args))
    q, docs = inputs(torch.float32)
    mk.matryoshka_contrastive_loss(q, docs, (3, 17, 70))
    mk.matryoshka_contrastive_loss(q, docs, (3, 17, 70), reduction="none")
    assert calls == ["nested_contrastive_total_torch", "nested_contrastive_rows_torch"]


def test_module_matches_the_op():
    q, docs = inputs(torch.float32)
    loss_fn = mk.nn.MatryoshkaContrastiveLoss((3, 17, 70), temperature=0.1, symmetric=True, dim_weights=[1, 2, 3])
    torch.testing.assert_close(loss_fn(q, docs), mk.matryoshka_contrastive_loss(
        q, docs, (3, 17, 70), temperature=0.1, symmetric=True, dim_weights=[1, 2, 3]))
    assert "symmetric=True" in repr(loss_fn)
    with pytest.raises(ValueError, match="temperature"):
        mk.nn.MatryoshkaContrastiveLoss((3, 17), temperature=0.0)
    with pytest.raises(ValueError, match="dim_weights"):
        mk.nn.MatryoshkaContrastiveLoss((3, 17), dim_weights=[1.0])
