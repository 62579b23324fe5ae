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
    torch.testing.assert_close(mk.matryoshka_contrastive_loss(**b, symmetric=False, backend="reference"),
                               reference.nested_contrastive_loss(**b), rtol=0, atol=0)
    torch.testing.assert_close(mk.matryoshka_contrastive_loss(**b), reference.nested_contrastive_loss(**b))
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
