import importlib

import pytest
import torch
import triton
import triton.language as tl
from helpers import TOL, rel_error

import mrl_kernels as mk
from mrl_kernels.kernels.indexing import row_offsets
from mrl_kernels.kernels.prefix_norms import prefix_norms_triton

CASES = [  # (N, D, dims)
    (37, 70, (17, 3, 70)),
    (33, 100, (100, 1, 50)),
    (1, 1, (1,)),
    (5, 2048, (8, 16, 32, 64, 128, 256, 512, 1024, 2048)),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def norms_float64(x, dims):
    x = x.double().cpu()
    return torch.stack([(x[:, :m] ** 2).sum(1).sqrt() for m in dims], dim=1)


@pytest.mark.parametrize("n,d,dims", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "eager", "reference"])
def test_matches_float64(backend, dtype, n, d, dims):
    x = torch.randn(n, d, dtype=dtype)
    out = mk.prefix_norms(x, dims, backend=backend)
    assert out.shape == (n, len(dims)) and out.dtype == torch.float32
    assert rel_error(out, norms_float64(x, dims)) < TOL[dtype]


@pytest.mark.triton
@pytest.mark.parametrize("n,d,dims", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_float64(kernel_device, dtype, n, d, dims):
    # A column slice of a wider tensor: the kernel must honour the row stride.
    x = torch.randn(n, d + 13, dtype=dtype, device=kernel_device)[:, :d]
    out = torch.full((n, len(dims)), float("nan"), device=kernel_device)
    prefix_norms_triton(x, dims, out=out)
    assert rel_error(out, norms_float64(x, dims)) < TOL[torch.float32]  # fp32 accumulation of exact inputs
    assert rel_error(mk.prefix_norms(x, dims, backend="triton"), norms_float64(x, dims)) < TOL[torch.float32]


def test_float64_kept():
    x = torch.randn(9, 20, dtype=torch.float64)
    out = mk.prefix_norms(x, [20, 5])
    assert out.dtype == torch.float64
    assert rel_error(out, norms_float64(x, [20, 5])) < 1e-14


@pytest.mark.parametrize("backend", ["torch", "eager", "reference"])
def test_nan_propagates(backend):
    x = torch.randn(4, 30)
    x[2, 10] = float("nan")
    out = mk.prefix_norms(x, [5, 30, 11], backend=backend)
    assert out[2, 0].isfinite() and out[2, 1].isnan() and out[2, 2].isnan()
    assert out[[0, 1, 3]].isfinite().all()


@pytest.mark.triton
def test_triton_nan_propagates(kernel_device):
    x = torch.randn(4, 30, device=kernel_device)
    x[2, 10] = float("nan")
    out = mk.prefix_norms(x, [5, 30, 11], backend="triton").cpu()
    assert out[2, 0].isfinite() and out[2, 1].isnan() and out[2, 2].isnan()


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_gradcheck(backend):
    x = torch.randn(6, 23, dtype=torch.float64, requires_grad=True)
    x.data[1] = 0  # a zero row has a zero subgradient, as in torch.linalg.norm
    assert torch.autograd.gradcheck(lambda t: mk.prefix_norms(t, [23, 4, 9], backend=backend)[[0, 2, 3, 4, 5]], (x,))
    out = mk.prefix_norms(x, [23, 4, 9], backend=backend)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert (g[1] == 0).all()


@pytest.mark.parametrize("backend", ["auto", "torch", "eager", "reference",
                                     pytest.param("triton", marks=pytest.mark.triton)])
def test_autocast_changes_nothing(backend, kernel_device):
    """Norms are float32 ops for autocast: under CPU autocast (bf16) fp32 x gives the same fp32 norms and
    fp32 gradients as without it, on every backend."""
    device = kernel_device if backend == "triton" else "cpu"
    if device != "cpu":
        pytest.skip("CPU autocast")
    dims = (17, 3, 70)
    x = torch.randn(37, 70, requires_grad=True)
    w = torch.randn(37, len(dims))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mk.prefix_norms(x, dims, backend=backend)
        (g,) = torch.autograd.grad((out * w).sum(), x)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad((norms_float64(x64, dims) * w.double()).sum(), x64)
    assert out.dtype == torch.float32 and rel_error(out, norms_float64(x, dims)) < 1e-5
    assert g.dtype == torch.float32 and rel_error(g, g64) < 1e-5


def test_auto_on_cpu_picks_by_shape(monkeypatch):
    """On the CPU, "auto" is the running sum for small x that wants no gradient, the chunked fallback for
    x[:, :max(dims)] at least FALLBACK_MIN_COLS wide and FALLBACK_MIN_ELEMENTS large, else the eager loop."""
    prefix_norms = importlib.import_module("mrl_kernels.ops.prefix_norms")  # the module, not the op it exports
    calls = []
    for name in ("prefix_norms_eager", "prefix_norms_torch", "prefix_norms_running_sum"):
        impl = getattr(prefix_norms, name)
        monkeypatch.setattr(prefix_norms, name, lambda *a, impl=impl, name=name: calls.append(name) or impl(*a))
    monkeypatch.setattr(prefix_norms, "FALLBACK_MIN_ELEMENTS", 5 * 256)
    mk.prefix_norms(torch.randn(5, 16), (4, 8, 16))                            # small: running sum
    mk.prefix_norms(torch.randn(5, 16, dtype=torch.bfloat16), (4, 8, 16))
    mk.prefix_norms(torch.randn(5, 16), (8, 16))                               # two dims: the loop
    mk.prefix_norms(torch.randn(5, 16, requires_grad=True), (4, 8, 16))        # wants a gradient: the loop
    with torch.no_grad():
        mk.prefix_norms(torch.randn(5, 16, requires_grad=True), (4, 8, 16))    # ... unless grad is off
    mk.prefix_norms(torch.randn(1024, 100), (8, 16, 64))                       # 64 wide, 2**16 elements
    mk.prefix_norms(torch.randn(1000, 100), (8, 16, 65))                       # 65 wide
    mk.prefix_norms(torch.randn(1025, 64), (8, 16, 64))                        # 1025 * 64 elements
    mk.prefix_norms(torch.randn(4, 300), (8, 256))                             # wide but small
    mk.prefix_norms(torch.randn(5, 300), (8, 256))                             # wide and large
    mk.prefix_norms(torch.randn(5, 300), (8, 255))                             # large but narrow
    assert calls == ["prefix_norms_running_sum"] * 2 + ["prefix_norms_eager"] * 2 + ["prefix_norms_running_sum"] * 2 + [
        "prefix_norms_eager", "prefix_norms_eager", "prefix_norms_eager", "prefix_norms_torch", "prefix_norms_eager"]


@pytest.mark.parametrize("n,d,dims", CASES)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_running_sum_matches_float64(dtype, n, d, dims):
    from mrl_kernels.ops.prefix_norms_torch import prefix_norms_running_sum

    x = torch.randn(n, d + 3, dtype=dtype)[:, :d]  # a strided slice, wider than every prefix
    out = prefix_norms_running_sum(x, dims)
    assert out.shape == (n, len(dims)) and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_error(out, norms_float64(x, dims)) < (1e-12 if dtype == torch.float64 else TOL[torch.float32])
    y = torch.randn(4, 30)
    y[2, 10] = float("nan")
    y[1] = 0.0
    out = prefix_norms_running_sum(y, (5, 30, 11))
    assert out[2, 0].isfinite() and out[2, 1].isnan() and out[2, 2].isnan() and (out[1] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "eager", "triton"])
def test_gradient_matches_float64(backend, kernel_device):
    device = kernel_device if backend == "triton" else "cpu"
    dims = (17, 3, 70)
    x = torch.randn(37, 70, device=device, requires_grad=True)
    w = torch.randn(37, len(dims), device=device)
    (g,) = torch.autograd.grad((mk.prefix_norms(x, dims, backend=backend) * w).sum(), x)
    x64 = x.detach().double().cpu().requires_grad_()
    (g64,) = torch.autograd.grad((norms_float64(x64, dims) * w.double().cpu()).sum(), x64)
    assert rel_error(g, g64) < 1e-5


def test_torch_compile_fullgraph():
    x = torch.randn(8, 40)
    fn = torch.compile(lambda t: mk.prefix_norms(t, [10, 40]).sum(1), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), mk.prefix_norms(x, [10, 40]).sum(1))


@triton.jit
def _row_offsets_probe(OUT, first_row, stride, BLOCK: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK)
    tl.store(OUT + tl.arange(0, BLOCK), row_offsets(rows, stride))


@pytest.mark.triton
def test_row_offsets_do_not_wrap_at_2_31(kernel_device):
    # Rows past 2**31 / stride: an int32 product would wrap negative; the kernels' offsets must not.
    first_row, stride = 2**21 - 2, 4099
    out = torch.zeros(4, dtype=torch.int64, device=kernel_device)
    _row_offsets_probe[(1,)](out, first_row, stride, BLOCK=4)
    expected = [(first_row + i) * stride for i in range(4)]
    assert out.tolist() == expected and max(expected) > 2**31


@pytest.mark.cuda
@pytest.mark.slow
def test_triton_past_2_31_elements():
    # 2**31 + 2 * 4096 fp16 elements (4 GB): the last rows sit past the int32 range of element offsets.
    d = 4096
    n = 2**31 // d + 2
    x = torch.empty(n, d, dtype=torch.float16, device="cuda")
    x[-3:].normal_()
    x[:-3].fill_(1.0)
    out = mk.prefix_norms(x, [d, 100], backend="triton")
    torch.testing.assert_close(out[-3:].cpu(), norms_float64(x[-3:], [d, 100]).float(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(out[:2].cpu(), torch.tensor([[64.0, 10.0]]).expand(2, 2))
