"""The public ops: dispatch to the reference, and every bad input rejected with a message naming the
argument before anything is computed."""
import pytest
import torch

import mrl_kernels as mk
from mrl_kernels import reference

N, C, D, DIMS = 11, 7, 20, (3, 17, 20)


def ce_inputs(**overrides):
    g = torch.Generator().manual_seed(0)
    args = dict(features=torch.randn(N, D, generator=g), weight=torch.randn(C, D, generator=g),
                target=torch.randint(0, C, (N,), generator=g), dims=DIMS)
    args.update(overrides)
    return args


def cl_inputs(**overrides):
    g = torch.Generator().manual_seed(1)
    args = dict(queries=torch.randn(N, D, generator=g), docs=torch.randn(N + 4, D, generator=g), dims=DIMS)
    args.update(overrides)
    return args


def topk_inputs(**overrides):
    g = torch.Generator().manual_seed(2)
    args = dict(queries=torch.randn(3, D, generator=g), database=torch.randn(50, D, generator=g), k=5)
    args.update(overrides)
    return args


def test_ops_equal_reference():
    a = ce_inputs()
    torch.testing.assert_close(mk.matryoshka_linear_cross_entropy(**a, backend="reference"),
                               reference.nested_cross_entropy(**a), rtol=0, atol=0)
    torch.testing.assert_close(mk.matryoshka_linear_cross_entropy(**a), reference.nested_cross_entropy(**a))
    b = cl_inputs()
    torch.testing.assert_close(mk.matryoshka_contrastive_loss(**b, symmetric=False),
                               reference.nested_contrastive_loss(**b), rtol=0, atol=0)
    c = topk_inputs()
    want = reference.prefix_topk(**c, dim=4, metric="cosine")
    for got, ref in zip(mk.prefix_topk(**c, dim=4, metric="cosine", backend="reference"), want):
        assert torch.equal(got, ref)
    got = mk.prefix_topk(**c, dim=4, metric="cosine")  # auto: the chunked torch backend on the CPU
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_separate_heads_and_bias_lists():
    heads = [torch.randn(C, m) for m in DIMS]
    biases = [torch.randn(C), None, torch.randn(C)]
    a = ce_inputs(weight=heads, bias=biases, reduction="none")
    torch.testing.assert_close(mk.matryoshka_linear_cross_entropy(**a), reference.nested_cross_entropy(**a))


def test_gather_single_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        b = cl_inputs()
        b["docs"].requires_grad_()
        loss = mk.matryoshka_contrastive_loss(**b, gather=True)
        torch.testing.assert_close(loss, reference.nested_contrastive_loss(**b))
        loss.backward()
        assert b["docs"].grad is not None and b["docs"].grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_backends():
    a = ce_inputs()
    with pytest.raises(NotImplementedError, match="backend='cuda' is not implemented"):
        mk.matryoshka_linear_cross_entropy(**a, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.prefix_norms(torch.randn(2, 3), [3], backend="fast")
    with pytest.raises(ValueError, match="needs CUDA tensors and CuPy"):
        mk.prefix_norms(torch.randn(2, 3), [3], backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        mk.prefix_norms(torch.randn(2, 3, dtype=torch.float64), [3], backend="triton")


BAD_CE = [
    (dict(features=torch.randn(N, D).tolist()), TypeError, "features must be a torch.Tensor"),
    (dict(features=torch.randn(N, D, 1)), ValueError, "features must be 2-D"),
    (dict(features=torch.randn(0, D), target=torch.zeros(0, dtype=torch.long)), ValueError, "features is empty"),
    (dict(features=torch.randint(0, 3, (N, D))), TypeError, "features must have dtype"),
    (dict(dims=(3, 21)), ValueError, r"dims\[1\] must be in \[1, 20\]"),
    (dict(dims=(0, 5)), ValueError, r"dims\[0\] must be in \[1, 20\]"),
    (dict(dims=(3, 3)), ValueError, "dims has repeated entries"),
    (dict(dims=()), TypeError, "dims must be a non-empty sequence"),
    (dict(dims=(3.0, 5)), TypeError, r"dims\[0\] must be an int"),
    (dict(weight=torch.randn(C, D + 1)), ValueError, r"weight must be \[C, 20\]"),
    (dict(weight=torch.randn(C, D, dtype=torch.float64)), TypeError, "weight has dtype torch.float64 but features"),
    (dict(weight=torch.randn(C, D, device="meta")), ValueError, "weight is on meta but features is on cpu"),
    (dict(weight=[torch.randn(C, 3), torch.randn(C, 17)]), TypeError, "sequence of 3"),
    (dict(weight=[torch.randn(C, 3), torch.randn(C, 16), torch.randn(C, 20)]), ValueError, r"weight\[1\] must be \[7, 17\]"),
    (dict(bias=torch.randn(C + 1)), ValueError, r"bias must have shape \[7\]"),
    (dict(bias=[torch.randn(C)] * 3), TypeError, "bias must be None or a \\[C\\]|bias must be"),
    (dict(target=torch.full((N,), C)), ValueError, "target has entry 7 outside"),
    (dict(target=torch.full((N,), -1)), ValueError, "target has entry -1 outside"),
    (dict(target=torch.zeros(N - 1, dtype=torch.long)), ValueError, r"target must have shape \[11\]"),
    (dict(target=torch.zeros(N)), TypeError, "target must have dtype"),
    (dict(dim_weights=[1.0, 2.0]), ValueError, "dim_weights must have one entry per dim"),
    (dict(dim_weights=[1.0, float("nan"), 1.0]), ValueError, r"dim_weights\[1\] must be finite"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
]


@pytest.mark.parametrize("overrides,exc,match", BAD_CE, ids=[m for _, _, m in BAD_CE])
def test_cross_entropy_rejects(overrides, exc, match):
    with pytest.raises(exc, match=match):
        mk.matryoshka_linear_cross_entropy(**ce_inputs(**overrides))


BAD_CL = [
    (dict(docs=torch.randn(N + 4, D + 1)), ValueError, r"docs must be \[M, 20\]"),
    (dict(docs=torch.randn(N - 1, D)), ValueError, "docs must have at least as many rows as queries"),
    (dict(docs=torch.randn(N, D, dtype=torch.float16)), TypeError, "docs has dtype"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature="0.05"), TypeError, "temperature must be a real number"),
    (dict(labels=torch.full((N,), N + 4)), ValueError, "labels has entry 15 outside"),
    (dict(labels=torch.zeros(N, dtype=torch.long), symmetric=True), ValueError, "labels must be unique"),
    (dict(gather=True), ValueError, "initialized torch.distributed"),
    (dict(gather=True, symmetric=True), ValueError, "symmetric=True with gather=True"),
    (dict(queries=torch.empty(0, D)), ValueError, "queries is empty"),
    (dict(dims=(21,)), ValueError, r"dims\[0\] must be in"),
]


@pytest.mark.parametrize("overrides,exc,match", BAD_CL, ids=[m for _, _, m in BAD_CL])
def test_contrastive_rejects(overrides, exc, match):
    with pytest.raises(exc, match=match):
        mk.matryoshka_contrastive_loss(**cl_inputs(**overrides))


BAD_TOPK = [
    (dict(k=51), ValueError, r"k must be in \[1, 50\]"),
    (dict(k=0), ValueError, r"k must be in \[1, 50\]"),
    (dict(dim=21), ValueError, r"dim must be in \[1, 20\]"),
    (dict(metric="dot"), ValueError, "metric must be one of"),
    (dict(queries=torch.randn(3, D, dtype=torch.float64)), TypeError, "database has dtype"),
    (dict(queries=torch.randn(3, D - 1)), ValueError, r"queries must be \[Q, 20\]"),
    (dict(queries=torch.empty(0, D)), ValueError, "queries is empty"),
    (dict(queries=torch.full((3, D), float("nan"))), ValueError, "queries contains NaN"),
]


@pytest.mark.parametrize("overrides,exc,match", BAD_TOPK, ids=[m for _, _, m in BAD_TOPK])
def test_prefix_topk_rejects(overrides, exc, match):
    with pytest.raises(exc, match=match):
        mk.prefix_topk(**topk_inputs(**overrides))


def test_prefix_norms_rejects():
    with pytest.raises(ValueError, match="x must be 2-D"):
        mk.prefix_norms(torch.randn(3), [1])
    with pytest.raises(ValueError, match=r"dims\[0\] must be in \[1, 4\]"):
        mk.prefix_norms(torch.randn(3, 4), [5])
    with pytest.raises(TypeError, match="x must have dtype"):
        mk.prefix_norms(torch.ones(3, 4, dtype=torch.int32), [2])


def _gather_worker(rank, store_path, queries, docs, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    q = queries[rank].clone().requires_grad_()
    d = docs[rank].clone().requires_grad_()
    loss = mk.matryoshka_contrastive_loss(q, d, DIMS, gather=True, reduction="sum")
    loss.backward()
    results[rank] = (loss.detach(), q.grad, d.grad)
    dist.destroy_process_group()


def test_gather_two_ranks(tmp_path):
    """Each rank's queries see both ranks' docs, positives at the rank's offset, and the gradient
    reaching each rank's docs is the sum over both ranks' losses."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    queries = torch.randn(2, 5, D, generator=g)
    docs = torch.randn(2, 6, D, generator=g)
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), queries, docs, results), nprocs=2)
    all_docs = docs.reshape(12, D).clone().requires_grad_()
    total = 0
    for rank in range(2):
        q = queries[rank].clone().requires_grad_()
        loss = reference.nested_contrastive_loss(q, all_docs, DIMS, labels=torch.arange(5) + 6 * rank,
                                                 reduction="sum")
        (q_grad,) = torch.autograd.grad(loss, q, retain_graph=True)
        torch.testing.assert_close(results[rank][0], loss.detach())
        torch.testing.assert_close(results[rank][1], q_grad)
        total = total + loss
    (docs_grad,) = torch.autograd.grad(total, all_docs)
    torch.testing.assert_close(torch.cat([results[0][2], results[1][2]]), docs_grad)
