"""The Triton kernels of the nested contrastive loss (ops/contrastive_triton.py) against the float64 definition
(reference.nested_contrastive_loss, one dim at a time so that every (row, dim) loss gets its own upstream
gradient): losses, dq and dd, through the per-prefix normalisation, at odd shapes (37 queries, 11 extra
negative docs, 70 features, a 3-dim prefix). Under the interpreter on CPU tensors."""
import pytest
import torch
from helpers import TOL, rel_error

from mrl_kernels import reference
from mrl_kernels.kernels import contrastive_backward, contrastive_forward
from mrl_kernels.kernels.contrastive_backward import grad_rows, softmax_stats
from mrl_kernels.kernels.contrastive_forward import row_lse
from mrl_kernels.ops.contrastive_triton import nested_contrastive_rows_triton

pytestmark = pytest.mark.triton

B, M, D = 37, 48, 70
# Query i's positive: a permutation into all 48 docs, so some positives are extra negatives' rows.
LABELS = torch.randperm(M, generator=torch.Generator().manual_seed(3))[:B]


def inputs(dtype, device, seed=0, n_docs=M):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g)
    docs = torch.randn(n_docs, D, generator=g)
    return q.to(device=device, dtype=dtype), docs.to(device=device, dtype=dtype)


def reference_rows(q, docs, dims, labels, **options):
    """[B, len(dims)] float64 per-row losses of the definition, differentiable."""
    return torch.stack([reference.nested_contrastive_loss(q, docs, (m,), labels=labels, reduction="none", **options)
                        for m in dims], 1)


def check(q, docs, dims, labels=LABELS, temperature=0.07, normalize=True, symmetric=False):
    """Loss, dq and dd against float64 under an arbitrary upstream gradient; returns (dq, dd), (their refs)."""
    q, docs = q.clone().requires_grad_(), docs.clone().requires_grad_()
    out = nested_contrastive_rows_triton(q, docs, dims, temperature, labels.to(q.device), normalize, symmetric)
    assert out.shape == (B, len(dims)) and out.dtype == torch.float32
    q64, d64 = (t.detach().cpu().double().requires_grad_() for t in (q, docs))
    ref = reference_rows(q64, d64, dims, labels, temperature=temperature, normalize=normalize, symmetric=symmetric)
    assert rel_error(out, ref) < TOL[q.dtype]
    upstream = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out.double() * upstream.to(out.device)).sum(), (q, docs))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q64, d64))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == q.dtype and rel_error(g, r) < TOL[q.dtype] * 2
    return grads, ref_grads


@pytest.mark.parametrize("dims", [(3, 17, 70), (17, 3, 70)], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_matches_float64(dims, normalize, symmetric, kernel_device):
    q, docs = inputs(torch.float32, kernel_device)
    check(q, docs, dims, temperature=0.07 if normalize else 20.0, normalize=normalize, symmetric=symmetric)


def test_default_labels_and_no_extra_negatives(kernel_device):
    q, docs = inputs(torch.float32, kernel_device, n_docs=B)
    check(q, docs, (17, 3, 70), labels=torch.arange(B), symmetric=True)


def test_shared_positives(kernel_device):
    """One-way, several queries with the same positive doc: the one-hot terms of dd add up (index_add_)."""
    q, docs = inputs(torch.float32, kernel_device)
    check(q, docs, (17, 3, 70), labels=LABELS % 7)


@pytest.fixture(params=["shipped_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    """The launch configs, or 16 x 16 x 16 tiles: several row, column and feature tiles at these shapes."""
    if request.param == "small_tiles":
        for module in (contrastive_forward, contrastive_backward):
            small = dict(module.launch_config(torch.bfloat16), BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
            monkeypatch.setattr(module, "launch_config", lambda dtype, small=small: small)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_16_bit(tiles, dtype, symmetric, kernel_device):
    q, docs = inputs(dtype, kernel_device)
    check(q, docs, (17, 3, 70), symmetric=symmetric)


@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_zero_prefixes(symmetric, kernel_device):
    """A query and a doc (a positive) whose first 17 features are zero: their 3- and 17-prefix norms are clamped
    at eps, where the normalised prefix is x / eps and the gradient through the norm vanishes (F.normalize).
    Their gradients are ~1e12 and dominate the tensors, so the other rows are checked on their own too."""
    q, docs = inputs(torch.float32, kernel_device)
    q[4, :17] = 0
    docs[LABELS[9], :17] = 0
    (dq, dd), (dq_ref, dd_ref) = check(q, docs, (3, 17, 70), symmetric=symmetric)
    assert dq[4].abs().max() > 1e9
    others = torch.ones(M, dtype=torch.bool)
    others[LABELS[9]] = False
    assert rel_error(dq[torch.arange(B) != 4], dq_ref[torch.arange(B) != 4]) < 2e-5
    assert rel_error(dd[others.to(dd.device)], dd_ref[others]) < 2e-5


@pytest.mark.parametrize("where", ["query", "doc"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_nan_propagates(where, symmetric, kernel_device):
    """A NaN feature at column 5: every loss whose scores include it is NaN, as in the definition (the 3-prefix
    never sees it), and the gradients carry NaN."""
    q, docs = inputs(torch.float32, kernel_device)
    (q if where == "query" else docs)[2, 5] = float("nan")
    q, docs = q.requires_grad_(), docs.requires_grad_()
    out = nested_contrastive_rows_triton(q, docs, (3, 17, 70), 0.07, LABELS.to(q.device), True, symmetric)
    ref = reference_rows(q.detach().cpu().double(), docs.detach().cpu().double(), (3, 17, 70), LABELS,
                         symmetric=symmetric)
    assert ref.isnan().any() and not ref.isnan().all()
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    dq, dd = torch.autograd.grad(out.sum(), (q, docs))
    assert dq.isnan().any() and dd.isnan().any()


def test_refuses_float64():
    q, docs = inputs(torch.float64, "cpu")
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        nested_contrastive_rows_triton(q, docs, (3, 70), 0.07, LABELS, True, False)


def test_rows_past_2_31_elements(kernel_device):
    """Row strides of 2**30 + 64 elements (int32, as the JIT passes them): row 2 of x or y starts past 2**31,
    where an int32 offset would wrap (under the interpreter: a crash). The storage is 4.3 GB (on the CPU virtual
    memory, of which only the rows are touched). Both kernels match a contiguous copy."""
    stride, dims = 2**30 + 64, (3, 17, 70)
    huge = torch.empty(2 * stride + D, dtype=torch.float16, device=kernel_device)
    far = huge.as_strided((3, D), (stride, 1))
    far.copy_(torch.randn(3, D))
    near = torch.randn(5, D).half().to(kernel_device)
    rand = lambda n, low, high: low + (high - low) * torch.rand(n, len(dims), device=kernel_device)  # noqa: E731
    for x, y in ((far, near), (near, far)):
        row_scale, col_scale = rand(len(x), 0.1, 0.2), rand(len(y), 0.1, 0.2)  # |scores| of a few units
        row_stats, col_stats = (softmax_stats(rand(len(t), -1, 1), rand(len(t), 3, 4)) for t in (x, y))
        dense = x.contiguous(), y.contiguous()
        torch.testing.assert_close(row_lse(x, y, row_scale, col_scale, dims),
                                   row_lse(*dense, row_scale, col_scale, dims), rtol=0, atol=0)
        for got, want in zip(grad_rows(x, y, row_scale, col_scale, row_stats, col_stats, dims),
                             grad_rows(*dense, row_scale, col_scale, row_stats, col_stats, dims)):
            assert torch.isfinite(want).all()
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_the_op_takes_the_kernels_when_asked(symmetric, kernel_device):
    """mk.matryoshka_contrastive_loss(backend="triton"): weights and the mean over queries on top of the rows."""
    import mrl_kernels as mk

    q, docs = (t.requires_grad_() for t in inputs(torch.float32, kernel_device))
    options = dict(labels=LABELS.to(kernel_device), symmetric=symmetric, dim_weights=[0.5, 2.0, 1.0])
    loss = mk.matryoshka_contrastive_loss(q, docs, (17, 3, 70), backend="triton", **options)
    q64, d64 = (t.detach().cpu().double().requires_grad_() for t in (q, docs))
    ref = reference.nested_contrastive_loss(q64, d64, (17, 3, 70), **{**options, "labels": LABELS})
    assert rel_error(loss, ref) < TOL[torch.float32]
    for g, r in zip(torch.autograd.grad(loss, (q, docs)), torch.autograd.grad(ref, (q64, d64))):
        assert rel_error(g, r) < TOL[torch.float32] * 2
