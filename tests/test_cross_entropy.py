"""Fused nested linear cross-entropy (torch fallback and Triton kernels) against the float64 eager loop."""
import pytest
import torch
import triton
import triton.language as tl
from helpers import TOL, rel_error

import mrl_kernels as mk
from mrl_kernels import reference
from mrl_kernels.kernels.nested_ce_backward_tma import grouped_tile
from mrl_kernels.kernels.nested_ce_forward import lse_partials

N, C, D = 37, 101, 70
DIMS = [(3, 17, 70), (17, 3, 70), (70,), (1, 2)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(dims, shared, with_bias, dtype, device, n=N, c=C, ignore_index=-100, seed=None, d=D):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x = rand(n, d)
    if shared:
        w = rand(c, d) / d**0.5
        b = rand(c) if with_bias else None
    else:
        w = [rand(c, m) / m**0.5 for m in dims]
        b = [None if j == 1 else rand(c) for j in range(len(dims))] if with_bias else None
    t = torch.randint(0, c, (n,), generator=g)
    t[::6] = ignore_index
    return x, w, b, t.to(device)


def leaves(x, w, b):
    ws = [w] if isinstance(w, torch.Tensor) else list(w)
    bs = [] if b is None else [b] if isinstance(b, torch.Tensor) else [v for v in b if v is not None]
    return [x, *ws, *bs]


def float64(t):
    if isinstance(t, (list, tuple)):
        return [None if v is None else float64(v) for v in t]
    return None if t is None else t.detach().cpu().double().requires_grad_()


def check(backend, dims, shared, with_bias, dtype, device, d=D, **options):
    x, w, b, t = make_inputs(dims, shared, with_bias, dtype, device, ignore_index=options.get("ignore_index", -100),
                             d=d)
    params = leaves(x, w, b)
    for p in params:
        p.requires_grad_()
    out = mk.matryoshka_linear_cross_entropy(x, w, t, dims, bias=b, backend=backend, **options)
    x64, w64, b64 = float64(x), float64(w), float64(b)
    ref = reference.nested_cross_entropy(x64, w64, t.cpu(), dims, bias=b64, **options)
    if options.get("return_per_dim"):
        (out, per_dim), (ref, ref_per_dim) = out, ref
        assert per_dim.shape == ref_per_dim.shape and not per_dim.requires_grad
        assert rel_error(per_dim, ref_per_dim) < TOL[dtype]
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_error(out, ref) < TOL[dtype]
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * upstream.to(out.device)).sum(), params)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), leaves(x64, w64, b64))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and rel_error(g, r) < TOL[dtype] * 2


BACKENDS = ["torch", "eager", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64(backend, dims, shared, with_bias, kernel_device):
    device = kernel_device if backend == "triton" else "cpu"
    check(backend, dims, shared, with_bias, torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [(12, 24, 96, 192), (8, 16, 64, 192), (192,)])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
def test_dims_on_tile_boundaries(backend, dims, shared, kernel_device):
    """Dims that are multiples of the K tile from some point on: the kernels walk whole tiles there (their
    fast loop) after the chunks below; features wider than the largest dim."""
    device = kernel_device if backend == "triton" else "cpu"
    check(backend, dims, shared, True, torch.float32, device, d=200, label_smoothing=0.1)
    check(backend, dims, shared, False, torch.bfloat16, device, d=200)


@pytest.mark.parametrize("form", ["running_sums", "per_prefix"])
@pytest.mark.parametrize("dims", [(17, 3, 70), (70,), (1, 2)])
@pytest.mark.parametrize("options", [{}, dict(reduction="none", label_smoothing=0.1, ignore_index=7),
                                     dict(reduction="sum", label_smoothing=0.2)],
                         ids=["mean", "none", "sum"])
def test_eager_both_forms(monkeypatch, form, dims, options):
    """The eager backend's shared head, as running sums of segment products and as F.linear per prefix (which
    one runs depends on the shape, see ops/nested_ce_eager.py): both match the float64 loop."""
    from mrl_kernels.ops import nested_ce_eager

    if form == "running_sums":
        monkeypatch.setattr(nested_ce_eager, "SEGMENT_COLUMNS_PER_DIM", 0)
    else:
        monkeypatch.setattr(nested_ce_eager, "SEGMENT_COLUMNS_PER_DIM", 10**9)
        monkeypatch.setattr(nested_ce_eager, "SEGMENT_SMALL_LOGITS", 0)
    check("eager", dims, True, True, torch.float32, "cpu", **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
def test_16_bit(backend, dtype, shared, kernel_device):
    device = kernel_device if backend == "triton" else "cpu"
    check(backend, (17, 3, 70), shared, True, dtype, device, label_smoothing=0.1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
def test_fp16_gradients_do_not_underflow(backend, shared, kernel_device):
    """The logit gradients are coef * softmax with coef = (loss weight) / N: here 2**-6 / 64 * ~1/4099, about
    6e-8, fp16's smallest subnormal (as at weight 1 once N * C passes ~1.7e7: N=2048, C=16,384 took dx 8.5%
    off). Unscaled, the kernel rounded them to a step or two of 6e-8: dx 9e-3, dW 3e-3 off; the bound is
    2.5x what the torch fallback reaches (2.7e-4, 4.1e-4), where the outputs' own fp16 rounding dominates."""
    device = kernel_device if backend == "triton" else "cpu"
    dims, weight = (8, 16), 2.0**-6
    x, w, b, t = make_inputs(dims, shared, False, torch.float16, device, n=64, c=4099, d=16, seed=1)
    params = leaves(x, w, b)
    for p in params:
        p.requires_grad_()
    loss = mk.matryoshka_linear_cross_entropy(x, w, t, dims, backend=backend)
    grads = torch.autograd.grad(loss * weight, params)
    x64, w64 = float64(x), float64(w)
    ref = reference.nested_cross_entropy(x64, w64, t.cpu(), dims)
    ref_grads = torch.autograd.grad(ref * weight, leaves(x64, w64, None))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float16 and rel_error(g, r) < 1e-3


def test_gradient_scale_is_a_power_of_two_bringing_the_bound_to_one():
    from mrl_kernels.kernels.nested_ce_backward import gradient_scale

    coef = torch.tensor([[1 / 2048, 3 / 2048], [-5 / 2048, 0.0]])
    scale = gradient_scale(coef).item()
    assert scale == 2.0**9 and 1 <= (coef.abs().sum(1).max() * scale).item() < 2
    assert gradient_scale(torch.zeros(3, 2)).item() == 1.0  # every row ignored
    assert gradient_scale(torch.tensor([[float("nan"), 1.0]])).item() == 1.0  # NaN stays NaN
    assert gradient_scale(torch.tensor([[1e-44]])).item() == 2.0**126  # subnormal bound: finite scale
    assert 1 <= 1e30 * gradient_scale(torch.tensor([[1e30]])).item() < 2


OPTIONS = [
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(reduction="none", return_per_dim=True),
    dict(return_per_dim=True, dim_weights=[0.5, 2.0, 1.0]),
    dict(label_smoothing=0.1, ignore_index=7),
    dict(label_smoothing=0.2, reduction="sum", dim_weights=[1.0, 0.0, 3.0]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
def test_options(backend, options, shared, kernel_device):
    device = kernel_device if backend == "triton" else "cpu"
    check(backend, (17, 3, 70), shared, True, torch.float32, device, **options)


@pytest.mark.triton
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
def test_class_splits_combine_exactly(kernel_device, shared):
    """Partials of several class splits combine to the one-split result; every (split, row, dim) is folded."""
    dims = (17, 3, 70)
    x, w, b, t = make_inputs(dims, shared, True, torch.float32, kernel_device, c=301, seed=0)
    w = w if shared else torch.cat(w, 1)
    b = b[None] if shared else torch.stack([torch.zeros(301, device=kernel_device) if v is None else v for v in b])
    for splits in (1, 3):
        part = lse_partials(x, w, b, dims, shared, splits=splits)
        # Maxima start at -inf and a fold's sum of exps is at least 1 (the max's own term).
        assert part.shape[0] == splits and part[:, 0].isfinite().all() and (part[:, 1] >= 1).all()
    one = mk.matryoshka_linear_cross_entropy(x, w if shared else list(torch.split(w, dims, 1)), t, dims,
                                             backend="triton", reduction="none")
    ref = mk.matryoshka_linear_cross_entropy(x.double(), (w if shared else list(torch.split(w, dims, 1))).double()
                                             if shared else [v.double() for v in torch.split(w, dims, 1)],
                                             t, dims, backend="torch", reduction="none")
    assert rel_error(one, ref) < 1e-5


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims", [(8, 16, 64, 192), (16, 40, 136), (192, 64)])
@pytest.mark.parametrize("splits", [1, 3])
def test_forward_by_tma_boxes(kernel_device, dtype, dims, splits):
    """The shared head's forward through tensor descriptors (16-bit, rows of whole 16 bytes): boxes below k_start
    that restart at negative columns, rows and classes past the end (N=37, C=301: the padded classes start at
    -inf), class splits with tiles past the last class, bias and label smoothing; against float64."""
    from mrl_kernels.kernels import nested_ce_forward

    launches = []
    kernel = nested_ce_forward.nested_lse_forward_kernel
    x, w, b, t = make_inputs(dims, True, True, dtype, kernel_device, c=301, d=200, seed=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nested_ce_forward, "nested_lse_forward_kernel",
                      type("Spy", (), {"__getitem__": lambda _, grid: lambda *a, **k: (launches.append(k["TMA"]),
                                                                                         kernel[grid](*a, **k))})())
        patch.setattr(nested_ce_forward, "class_splits", lambda *args: splits)
        losses, _ = nested_ce_forward.nested_ce_forward_triton(x, w, b[None], t, dims, True, -100, 0.1)
    assert launches == [True]
    _, ref = reference.nested_cross_entropy(float64(x), float64(w), t.cpu(), dims, bias=float64(b),
                                            reduction="none", label_smoothing=0.1, return_per_dim=True)
    assert rel_error(losses, ref) < TOL[dtype]


def test_box_chunks_cover_each_prefix_exactly():
    """Every fold of the TMA box plan sees the boxes since the last restart cover [0, m) exactly: the ones
    starting at negative columns read zeros there, none reaches past m; box starts are whole 16 bytes
    for the paper's dims (ResNet-50: 8, 16, ...; and the plan reaches k_start for the whole tiles)."""
    from mrl_kernels.kernels.nested_ce_forward import box_chunks

    for dims, k_start in [((8, 16, 32, 64, 128, 256, 512, 1024, 2048), 64), ((12, 24, 48, 96, 192), 128),
                          ((3, 17, 70), 70), ((100, 50, 16), 128), ((64, 128), 0), ((40, 16, 136), 192)]:
        covered, folded = None, {}
        for k0, restart, _, dim in box_chunks(dims, k_start, 16):
            covered = set() if restart or covered is None else covered
            covered |= set(range(max(k0, 0), k0 + 16))
            if dim >= 0:
                folded[dim] = covered.copy()
        assert folded == {j: set(range(m)) for j, m in enumerate(dims) if m <= k_start}
        assert covered is None if not k_start else covered == set(range(k_start))
    assert all(k0 % 8 == 0 for k0, *_ in box_chunks((8, 16, 32, 64, 128), 64, 16))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
def test_backward_in_class_chunks(kernel_device, monkeypatch, shared, dtype):
    """The backward launched one class tile at a time (C = 101: chunks of 64 and 37 classes): targets, label
    smoothing (over all C), the bias gradient and dW land in the right chunk."""
    from mrl_kernels.kernels import nested_ce_backward

    monkeypatch.setattr(nested_ce_backward, "DW_CHUNK_BYTES", 1)
    assert nested_ce_backward.class_chunk(C, D, 64) == 64
    check("triton", (17, 3, 70), shared, True, dtype, kernel_device, label_smoothing=0.1, ignore_index=7)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dims,d", [((12, 24, 96, 192), 200), ((8, 16, 64, 192), 200), ((192,), 200),
                                    ((17, 3, 70), 80)])
def test_backward_by_tma(kernel_device, monkeypatch, dims, d, dtype):
    """The shared head's TMA backward (16-bit rows of whole 16 bytes; gradient tiles added by tensor-descriptor
    reductions, which the interpreter runs through the root conftest's shim): 16-wide boxes cut into pieces at
    the boundaries below k_start (12, 24, 96 and 3, 17 inside boxes; 70 inside the last box, with features past
    it), class chunks of one tile (C=101: the second chunk ragged), rows past the end (N=37), bias, smoothing
    and ignored rows; against float64."""
    from mrl_kernels.kernels import nested_ce_backward

    if kernel_device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA backward is launched on sm_90 and later only")
    monkeypatch.setattr(nested_ce_backward, "DW_CHUNK_BYTES", 1)
    launches = []
    kernel = nested_ce_backward.nested_ce_backward_tma_kernel
    monkeypatch.setattr(nested_ce_backward, "nested_ce_backward_tma_kernel",
                        type("Spy", (), {"__getitem__": lambda _, grid: lambda *a, **k: (launches.append(grid),
                                                                                         kernel[grid](*a, **k))})())
    check("triton", dims, True, True, dtype, kernel_device, d=d, label_smoothing=0.1, ignore_index=7)
    assert len(launches) == 2  # one per class chunk


@triton.jit
def grouped_tiles(OUT, row_tiles, class_tiles, GROUP_M: tl.constexpr):
    row, cls = grouped_tile(tl.program_id(0), row_tiles, class_tiles, GROUP_M)
    tl.store(OUT + 2 * tl.program_id(0), row)
    tl.store(OUT + 2 * tl.program_id(0) + 1, cls)


@pytest.mark.triton
def test_grouped_tile_order_visits_every_tile_once(kernel_device):
    """The TMA backward's grouped order: every (row tile, class tile) exactly once, GROUP_M row tiles sweeping
    each class tile together, the last group ragged (11 row tiles, groups of 4)."""
    out = torch.full((11 * 5, 2), -1, dtype=torch.int32, device=kernel_device)
    grouped_tiles[(11 * 5,)](out, 11, 5, GROUP_M=4)
    pairs = [tuple(p) for p in out.tolist()]
    assert sorted(pairs) == [(r, c) for r in range(11) for c in range(5)]
    assert pairs[:5] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1)] and pairs[-3:] == [(8, 4), (9, 4), (10, 4)]


def test_head_pieces_cut_at_boxes_and_boundaries():
    from mrl_kernels.kernels.nested_ce_backward_tma import head_pieces

    assert head_pieces((8, 16, 64, 2048), 64, 16).tolist() == [
        [48, 48, 64, 2], [32, 32, 48, -1], [16, 16, 32, -1], [0, 8, 16, 1], [0, 0, 8, 0]]
    assert head_pieces((17, 3, 70), 70, 16).tolist()[:2] == [[64, 64, 70, 2], [48, 48, 64, -1]]
    assert head_pieces((64, 128), 0, 16).shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, kernel_device):
    device = kernel_device if backend == "triton" else "cpu"
    x, w, b, t = make_inputs((3, 17, 70), True, True, torch.float32, device, seed=1)
    x[4, 10] = float("nan")
    t[4] = 0
    per_row = mk.matryoshka_linear_cross_entropy(x, w, t, (3, 17, 70), bias=b, reduction="none", backend=backend,
                                                 return_per_dim=True)[1].cpu()
    assert per_row[4, 0].isfinite() and per_row[4, 1:].isnan().all()
    assert mk.matryoshka_linear_cross_entropy(x, w, t, (3, 17, 70), bias=b, backend=backend).isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_is_nan_like_torch(backend, kernel_device):
    device = kernel_device if backend == "triton" else "cpu"
    x, w, b, t = make_inputs((3, 70), True, False, torch.float32, device, seed=2)
    t[:] = -100
    assert mk.matryoshka_linear_cross_entropy(x, w, t, (3, 70), backend=backend).isnan()
    assert mk.matryoshka_linear_cross_entropy(x, w, t, (3, 70), backend=backend, reduction="sum") == 0


def test_auto_on_cpu_picks_by_size(monkeypatch):
    """On the CPU, "auto" runs the eager loop while len(dims) * N * C is at most EAGER_CPU_LOGITS and the
    chunked torch fallback above."""
    from mrl_kernels.ops import nested_ce

    calls = []
    forward, eager = nested_ce.nested_ce_forward_torch, nested_ce.nested_ce_eager
    monkeypatch.setattr(nested_ce, "nested_ce_forward_torch", lambda *a: calls.append("torch") or forward(*a))
    monkeypatch.setattr(nested_ce, "nested_ce_eager", lambda *a: calls.append("eager") or eager(*a))
    x, w, b, t = make_inputs((3, 70), True, False, torch.float32, "cpu", seed=3)
    mk.matryoshka_linear_cross_entropy(x, w, t, (3, 70))
    monkeypatch.setattr(nested_ce, "EAGER_CPU_LOGITS", 2 * N * C - 1)
    mk.matryoshka_linear_cross_entropy(x, w, t, (3, 70))
    assert calls == ["eager", "torch"]


def test_auto_on_cpu_small_heads():
    """A head of few classes takes the fallback once N * sum(dims) reaches FALLBACK_MIN_FEATURES."""
    from mrl_kernels.ops.nested_ce import FALLBACK_MIN_FEATURES, _auto_backend

    cpu = torch.device("cpu")
    assert _auto_backend(cpu, FALLBACK_MIN_FEATURES // 73, 10, (3, 70), wants_grad=True) == "eager"
    assert _auto_backend(cpu, FALLBACK_MIN_FEATURES // 73 + 1, 10, (3, 70), wants_grad=True) == "torch"
    assert _auto_backend(cpu, FALLBACK_MIN_FEATURES // 73 + 1, 17, (3, 70), wants_grad=True) == "eager"


AUTOCAST_BACKENDS = ["torch", "eager", "reference", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", ["auto", *AUTOCAST_BACKENDS])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_autocast_like_f_linear(backend, shared, with_bias, kernel_device):
    """Under CPU autocast with fp32 leaves that all need gradients, every backend computes what the same loss
    gives on inputs cast to bf16 by hand (the matmuls in bf16), returns the loss in float32 as F.cross_entropy
    does under autocast, and hands fp32 gradients to the fp32 leaves."""
    device = kernel_device if backend == "triton" else "cpu"
    if device != "cpu":
        pytest.skip("CPU autocast")
    dims = (17, 3, 70)
    x, w, b, t = make_inputs(dims, shared, with_bias, torch.float32, device, seed=4)
    params = leaves(x, w, b)
    for p in params:
        p.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mk.matryoshka_linear_cross_entropy(x, w, t, dims, bias=b, label_smoothing=0.1, backend=backend)
    grads = torch.autograd.grad(out, params)
    bf16 = lambda v: float64(v.detach().bfloat16()) if isinstance(v, torch.Tensor) else float64(  # noqa: E731
        [None if u is None else u.detach().bfloat16() for u in v])
    x64, w64, b64 = bf16(x), bf16(w), None if b is None else bf16(b)
    ref = reference.nested_cross_entropy(x64, w64, t, dims, bias=b64, label_smoothing=0.1)
    ref_grads = torch.autograd.grad(ref, leaves(x64, w64, b64))
    assert out.dtype == torch.float32 and rel_error(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and rel_error(g, r) < 2e-2


@pytest.mark.parametrize("backend", AUTOCAST_BACKENDS)
def test_autocast_backward_inside_the_context(backend, kernel_device):
    """Per-row losses (the torch and Triton paths' separate backward) with backward called under autocast too."""
    device = kernel_device if backend == "triton" else "cpu"
    if device != "cpu":
        pytest.skip("CPU autocast")
    x, w, b, t = make_inputs((17, 3, 70), True, True, torch.float32, device, seed=7)
    x.requires_grad_(), w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mk.matryoshka_linear_cross_entropy(x, w, t, (17, 3, 70), bias=b, reduction="none", backend=backend)
        dx, dw = torch.autograd.grad(out.sum(), (x, w))
    x64, w64 = float64(x.detach().bfloat16()), float64(w.detach().bfloat16())
    ref = reference.nested_cross_entropy(x64, w64, t, (17, 3, 70), bias=float64(b.bfloat16()), reduction="none")
    assert out.dtype == torch.float32 and rel_error(out, ref) < 1e-2
    for g, r in zip((dx, dw), torch.autograd.grad(ref.sum(), (x64, w64))):
        assert g.dtype == torch.float32 and rel_error(g, r) < 2e-2


def test_float64_ignores_autocast():
    """Autocast leaves float64 alone (as F.linear does): the fused path stays exact."""
    x, w, b, t = make_inputs((17, 3, 70), True, True, torch.float64, "cpu", seed=8)
    want = mk.matryoshka_linear_cross_entropy(x, w, t, (17, 3, 70), bias=b, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mk.matryoshka_linear_cross_entropy(x, w, t, (17, 3, 70), bias=b, backend="torch")
    assert got.dtype == torch.float64 and rel_error(got, want) < 1e-12


def test_torch_compile_fullgraph():
    x, w, b, t = make_inputs((17, 3, 70), True, True, torch.float32, "cpu", seed=5)
    w.requires_grad_()

    def loss_fn(x, w, b, t):
        return mk.matryoshka_linear_cross_entropy(x, w, t, (17, 3, 70), bias=b, label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True)
    out = compiled(x, w, b, t)
    (g,) = torch.autograd.grad(out, w)
    want = loss_fn(x, w, b, t)
    (g_want,) = torch.autograd.grad(want, w)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(g, g_want)


@pytest.mark.cuda
@pytest.mark.slow
def test_triton_past_2_31_feature_elements():
    """Features of 2**31 + 64 * 2048 bf16 elements: the last rows' offsets (and their dx offsets) pass the
    int32 range. Rows are independent, so the last rows are checked against float64 on their own."""
    n, d, c, dims = 2**31 // 2048 + 64, 2048, 16, (8, 2048)
    x = torch.empty(n, d, dtype=torch.bfloat16, device="cuda").normal_()
    w = (torch.randn(c, d, device="cuda") / d**0.5).bfloat16().requires_grad_()
    x.requires_grad_()
    t = torch.randint(0, c, (n,), device="cuda")
    losses = mk.matryoshka_linear_cross_entropy(x, w, t, dims, backend="triton", reduction="none")
    (dx,) = torch.autograd.grad(losses[-3:].sum(), x)
    tail = float64(x[-3:])
    ref = reference.nested_cross_entropy(tail, float64(w), t[-3:].cpu(), dims, reduction="none")
    (dx_ref,) = torch.autograd.grad(ref.sum(), tail)
    assert rel_error(losses[-3:], ref) < 1e-2 and rel_error(dx[-3:], dx_ref) < 2e-2
    assert dx[:-3].abs().max().item() == 0  # nothing leaked into rows whose loss was not differentiated


def test_torch_path_refuses_a_second_backward():
    x, w, b, t = make_inputs((3, 70), True, False, torch.float32, "cpu", seed=6)
    w.requires_grad_()
    loss = mk.matryoshka_linear_cross_entropy(x, w, t, (3, 70), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_auto_on_cuda_follows_the_measurements():
    """On a GPU, "auto" trains through the eager backend (never the reference) while its logits fit (the
    Triton backward is slower, see bench/NOTES.md) and uses Triton otherwise (forward only, or logits too big)."""
    from mrl_kernels.ops.nested_ce import EAGER_AUTO_BYTES, _auto_backend

    cuda = torch.device("cuda")
    assert _auto_backend(cuda, 8, 101, (3, 70), wants_grad=True) == "eager"
    assert _auto_backend(cuda, 8, 101, (3, 70), wants_grad=False) == "triton"
    big = EAGER_AUTO_BYTES // (12 * 101 * 2) + 1
    assert _auto_backend(cuda, big, 101, (3, 70), wants_grad=True) == "triton"
