"""mrl_kernels.nn against the paper's own modules (MRL_Linear_Layer, Matryoshka_CE_Loss) and the float64
tuple-of-logits path."""
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import rel_error

from mrl_kernels.nn import MatryoshkaCrossEntropyLoss, MatryoshkaLinear, MatryoshkaLinearCrossEntropy

N, C, D = 37, 101, 70
DIMS = [(3, 17, 70), (17, 3, 70)]


# ---- the official modules (github.com/RAIVNLab/MRL, MRL.py), behaviour reproduced for comparison ----

class Matryoshka_CE_Loss(nn.Module):
    def __init__(self, relative_importance: List[float] = None, **kwargs):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(**kwargs)
        self.relative_importance = relative_importance

    def forward(self, output, target):
        losses = torch.stack([self.criterion(output_i, target) for output_i in output])
        rel_importance = (torch.ones_like(losses) if self.relative_importance is None
                          else torch.tensor(self.relative_importance))
        return (losses * rel_importance).sum()


class MRL_Linear_Layer(nn.Module):
    def __init__(self, nesting_list: List, num_classes=1000, efficient=False, **kwargs):
        super().__init__()
        self.nesting_list = nesting_list
        self.num_classes = num_classes
        self.efficient = efficient
        if self.efficient:
            setattr(self, "nesting_classifier_0", nn.Linear(nesting_list[-1], self.num_classes, **kwargs))
        else:
            for i, num_feat in enumerate(self.nesting_list):
                setattr(self, f"nesting_classifier_{i}", nn.Linear(num_feat, self.num_classes, **kwargs))

    def forward(self, x):
        nesting_logits = ()
        for i, num_feat in enumerate(self.nesting_list):
            if self.efficient:
                logits = torch.matmul(x[:, :num_feat], (self.nesting_classifier_0.weight[:, :num_feat]).t())
                if self.nesting_classifier_0.bias is not None:
                    logits = logits + self.nesting_classifier_0.bias
                nesting_logits += (logits,)
            else:
                nesting_logits += (getattr(self, f"nesting_classifier_{i}")(x[:, :num_feat]),)
        return nesting_logits


# ----------------------------------------------------------------------------------------------------

def inputs(n=N, d=D, c=C, seed=0, ignore_every=6, ignore_index=-100, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::ignore_every] = ignore_index
    return x, t


def randomize_(module, seed=1):
    """Non-default values everywhere (biases included), so a key mix-up cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / 4)
    return module


def assert_same_outputs(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.shape == v.shape and torch.equal(u, v)


@pytest.mark.parametrize("dims", DIMS + [(70,)])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_state_dict_round_trips_with_official(dims, shared, bias):
    if shared and max(dims) != dims[-1]:
        dims = tuple(sorted(dims))  # the official shared head is nn.Linear(nesting_list[-1], C)
    x, _ = inputs()
    official = randomize_(MRL_Linear_Layer(list(dims), C, efficient=shared, bias=bias).double())
    ours = MatryoshkaLinear(D, C, dims, efficient=shared, bias=bias, dtype=torch.float64)
    assert ours.state_dict().keys() == official.state_dict().keys()
    ours.load_state_dict(official.state_dict())                          # official -> ours
    assert_same_outputs(ours(x), official(x))
    ours = randomize_(MatryoshkaLinear(D, C, dims, shared=shared, bias=bias, dtype=torch.float64), seed=2)
    official.load_state_dict(ours.state_dict())                          # ours -> official
    assert_same_outputs(ours(x), official(x))
    assert ours.efficient == shared and ours.nesting_list == list(dims) and ours.num_classes == C


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
def test_wide_input_ignores_extra_features(shared):
    """in_features > max(dims): the features past max(dims) are ignored, as by the official layer."""
    x, t = inputs(d=80)
    official = randomize_(MRL_Linear_Layer([3, 17, 70], C, efficient=shared).double())
    ours = MatryoshkaLinear(80, C, (3, 17, 70), shared=shared, dtype=torch.float64)
    ours.load_state_dict(official.state_dict())
    assert_same_outputs(ours(x), official(x))
    fused = MatryoshkaLinearCrossEntropy(80, C, (3, 17, 70), shared=shared, dtype=torch.float64, backend="torch")
    fused.load_mrl_linear_state_dict(official.state_dict())
    ref = Matryoshka_CE_Loss()(official(x), t)
    assert rel_error(fused(x, t), ref) < 1e-12


def test_weight_and_bias_are_the_parameters():
    shared = MatryoshkaLinear(D, C, (3, 70), shared=True)
    w, b = shared.weight_and_bias()
    assert w is shared.nesting_classifier_0.weight and b is shared.nesting_classifier_0.bias
    per_dim = MatryoshkaLinear(D, C, (17, 3), bias=False)
    w, b = per_dim.weight_and_bias()
    assert b is None and [v.shape for v in w] == [(C, 17), (C, 3)]
    assert w[0] is per_dim.nesting_classifier_0.weight and w[1] is per_dim.nesting_classifier_1.weight


@pytest.mark.parametrize("kwargs", [dict(), dict(relative_importance=[0.5, 2.0, 1.25]),
                                    dict(relative_importance=[1.0, 0.25, 3.0], label_smoothing=0.1, ignore_index=7),
                                    dict(label_smoothing=0.2, reduction="sum")], ids=str)
def test_ce_loss_matches_official(kwargs):
    x, t = inputs(ignore_index=kwargs.get("ignore_index", -100))
    t[1] = 7
    logits = MRL_Linear_Layer([3, 17, 70], C, efficient=True).double()(x)
    ref = Matryoshka_CE_Loss(**kwargs)(logits, t)
    out = MatryoshkaCrossEntropyLoss(**kwargs)(logits, t)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-14, atol=0)
    if "relative_importance" in kwargs:  # the alias
        kwargs = dict(kwargs, dim_weights=kwargs.pop("relative_importance"))
        assert torch.allclose(MatryoshkaCrossEntropyLoss(**kwargs)(logits, t), ref, rtol=1e-14, atol=0)


def test_ce_loss_weights_are_not_rounded_to_float32():
    """The official module turns relative_importance into a float32 tensor; ours keeps the loss dtype."""
    x, t = inputs()
    logits = MRL_Linear_Layer([3, 70], C, efficient=True).double()(x)
    out = MatryoshkaCrossEntropyLoss([0.1, 0.3])(logits, t)
    ref = 0.1 * F.cross_entropy(logits[0], t) + 0.3 * F.cross_entropy(logits[1], t)
    assert torch.allclose(out, ref, rtol=1e-14, atol=0)
    assert torch.allclose(out, Matryoshka_CE_Loss([0.1, 0.3])(logits, t), rtol=1e-6)


def test_ce_loss_reduction_none_is_per_row():
    x, t = inputs()
    logits = MRL_Linear_Layer([3, 70], C, efficient=True).double()(x)
    out = MatryoshkaCrossEntropyLoss([0.5, 2.0], reduction="none")(logits, t)
    ref = 0.5 * F.cross_entropy(logits[0], t, reduction="none") + 2.0 * F.cross_entropy(logits[1], t, reduction="none")
    assert out.shape == (N,) and torch.allclose(out, ref, rtol=1e-14, atol=0)


OPTIONS = [dict(), dict(dim_weights=[0.5, 2.0, 1.0], label_smoothing=0.1, ignore_index=7), dict(reduction="none"),
           dict(reduction="sum", label_smoothing=0.2)]


@pytest.mark.parametrize("dims", DIMS, ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_fused_matches_tuple_of_logits_path(dims, shared, bias, options):
    x, t = inputs(ignore_index=options.get("ignore_index", -100))
    t[1] = 7
    x.requires_grad_()
    module = randomize_(MatryoshkaLinearCrossEntropy(D, C, dims, shared=shared, bias=bias, backend="torch",
                                                     dtype=torch.float64, **options))
    params = [x, *module.parameters()]
    assert len(params) == 1 + (1 if shared else len(dims)) * (2 if bias else 1)
    out = module(x, t)
    ce = {k: v for k, v in options.items() if k != "dim_weights"}
    ref = MatryoshkaCrossEntropyLoss(options.get("dim_weights"), **ce)(module.head(x), t)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert rel_error(out, ref) < 1e-12
    upstream = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), params)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and rel_error(g, r) < 1e-12


def test_fused_return_per_dim_and_default_backend():
    x, t = inputs()
    module = MatryoshkaLinearCrossEntropy(D, C, (17, 3, 70), dtype=torch.float64)  # backend="auto"
    total, per_dim = module(x, t, return_per_dim=True)
    ref = [F.cross_entropy(z, t) for z in module.head(x)]
    assert per_dim.shape == (3,) and not per_dim.requires_grad
    assert rel_error(per_dim, torch.stack(ref)) < 1e-12 and rel_error(total, sum(ref)) < 1e-12


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
def test_logits_at_one_dim(shared):
    x, _ = inputs()
    module = randomize_(MatryoshkaLinearCrossEntropy(D, C, (17, 3, 70), shared=shared, dtype=torch.float64))
    every = module.head(x)
    for j, m in enumerate(module.dims):
        assert torch.equal(module.logits(x, m), every[j])
    assert torch.equal(module.logits(x), every[2])  # default: the largest dim
    if shared:  # the shared head serves any prefix
        w, b = module.head.weight_and_bias()
        assert torch.allclose(module.logits(x, 5), x[:, :5] @ w[:, :5].T + b, rtol=1e-14, atol=1e-14)
    else:
        with pytest.raises(ValueError, match=r"dim must be one of dims \[17, 3, 70\]"):
            module.logits(x, 5)
    with pytest.raises(ValueError, match=r"dim must be in \[1, 70\]"):
        module.logits(x, 71)


def test_load_mrl_linear_state_dict_with_prefix():
    official = randomize_(MRL_Linear_Layer([3, 17, 70], C, efficient=True))
    checkpoint = {"conv1.weight": torch.zeros(3), **{f"fc.{k}": v for k, v in official.state_dict().items()}}
    module = MatryoshkaLinearCrossEntropy(D, C, (3, 17, 70), shared=True)
    module.load_mrl_linear_state_dict(checkpoint, prefix="fc.")
    assert set(module.state_dict()) == {"head.nesting_classifier_0.weight", "head.nesting_classifier_0.bias"}
    x, _ = inputs(dtype=torch.float32)
    assert_same_outputs(module.head(x), official(x))
    text = repr(module)
    assert "dims=(3, 17, 70)" in text and "label_smoothing=0.0" in text and "reduction='mean'" in text


def test_validation_errors():
    with pytest.raises(ValueError, match="repeated"):
        MatryoshkaLinear(D, C, (3, 17, 3))
    with pytest.raises(ValueError, match=r"dims\[0\] must be >= 1"):
        MatryoshkaLinear(D, C, (0, 17))
    with pytest.raises(TypeError, match=r"dims\[1\] must be an int"):
        MatryoshkaLinear(D, C, (3, 17.5))
    with pytest.raises(TypeError, match="dims must be a non-empty sequence"):
        MatryoshkaLinear(D, C, ())
    with pytest.raises(ValueError, match=r"in_features must be >= max\(dims\) = 70, got 60"):
        MatryoshkaLinear(60, C, (3, 70))
    with pytest.raises(ValueError, match=r"in_features must be >= max\(dims\)"):
        MatryoshkaLinearCrossEntropy(60, C, (3, 70))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        MatryoshkaLinear(D, 0, (3, 70))
    with pytest.raises(ValueError, match="efficient is an alias of shared"):
        MatryoshkaLinear(D, C, (3, 70), shared=False, efficient=True)
    assert MatryoshkaLinear(D, C, (3, 70), shared=True, efficient=True).shared
    assert MatryoshkaLinear(D, C, (3, 70), efficient=True).shared and not MatryoshkaLinear(D, C, (3, 70)).shared
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 70\]"):
        MatryoshkaLinear(D, C, (3, 70))(torch.randn(4, 69))

    x, t = inputs()
    logits = MRL_Linear_Layer([3, 17, 70], C).double()(x)
    with pytest.raises(ValueError, match="relative_importance has 2 entries but output has 3"):
        MatryoshkaCrossEntropyLoss([1.0, 2.0])(logits, t)
    with pytest.raises(ValueError, match="relative_importance has 2 entries"):
        MatryoshkaCrossEntropyLoss(dim_weights=[1.0, 2.0])(logits, t)
    with pytest.raises(ValueError, match="pass only one of them"):
        MatryoshkaCrossEntropyLoss([1.0], dim_weights=[1.0])
    with pytest.raises(ValueError, match=r"relative_importance\[1\] must be finite"):
        MatryoshkaCrossEntropyLoss([1.0, float("nan")])

    with pytest.raises(ValueError, match="dim_weights must have one entry per dim"):
        MatryoshkaLinearCrossEntropy(D, C, (3, 70), dim_weights=[1.0])
    with pytest.raises(ValueError, match="reduction must be one of"):
        MatryoshkaLinearCrossEntropy(D, C, (3, 70), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        MatryoshkaLinearCrossEntropy(D, C, (3, 70), label_smoothing=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        MatryoshkaLinearCrossEntropy(D, C, (3, 70), backend="cutlass")
    module = MatryoshkaLinearCrossEntropy(D, C, (3, 70), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"features must be \[\.\.\., 70\]"):
        module(x[:, :69], t)
    with pytest.raises(ValueError, match="target has entry"):
        module(x, torch.full((N,), C))


@pytest.mark.triton
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_dim"])
def test_triton_backend(shared, kernel_device):
    dims, n, c, d = (5, 2, 24), 9, 13, 24
    x, t = inputs(n=n, d=d, c=c, ignore_every=4, dtype=torch.float32)
    module = randomize_(MatryoshkaLinearCrossEntropy(d, c, dims, shared=shared, backend="triton",
                                                     label_smoothing=0.1, device=kernel_device))
    x = x.to(kernel_device).requires_grad_()
    params = [x, *module.parameters()]
    out = module(x, t.to(kernel_device))
    grads = torch.autograd.grad(out, params)
    ref_module = MatryoshkaLinearCrossEntropy(d, c, dims, shared=shared, backend="torch", label_smoothing=0.1,
                                              dtype=torch.float64)
    ref_module.load_state_dict(module.state_dict())
    x64 = x.detach().cpu().double().requires_grad_()
    ref = ref_module(x64, t)
    ref_grads = torch.autograd.grad(ref, [x64, *ref_module.parameters()])
    assert out.dtype == torch.float32 and rel_error(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and rel_error(g, r) < 2e-5


def test_shared_defaults_to_per_dim_heads_everywhere():
    """One rule for `shared`: per-dim heads (the paper's MRL; the official layer's efficient=False) unless asked."""
    assert not MatryoshkaLinear(D, C, (3, 70)).shared
    assert not MatryoshkaLinearCrossEntropy(D, C, (3, 70)).shared
    assert MatryoshkaLinearCrossEntropy(D, C, (3, 70), efficient=True).shared
    with pytest.raises(ValueError, match="efficient is an alias of shared"):
        MatryoshkaLinearCrossEntropy(D, C, (3, 70), shared=False, efficient=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_takes_leading_dims(reduction):
    """[..., D] features with [...] targets, as MatryoshkaLinear takes them: the same as the flattened rows."""
    module = randomize_(MatryoshkaLinearCrossEntropy(D, C, (17, 3, 70), dtype=torch.float64, reduction=reduction))
    x = torch.randn(2, 3, 5, D, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, C, (2, 3, 5))
    loss, per_dim = module(x, t, return_per_dim=True)
    flat, flat_per_dim = module(x.reshape(-1, D), t.reshape(-1), return_per_dim=True)
    lead = () if reduction == "mean" else (2, 3, 5)
    assert loss.shape == lead and per_dim.shape == (*lead, 3) or reduction == "mean" and per_dim.shape == (3,)
    assert torch.allclose(loss.reshape(-1), flat.reshape(-1), rtol=1e-12, atol=0)
    assert torch.allclose(per_dim.reshape(-1), flat_per_dim.reshape(-1), rtol=1e-12, atol=0)
    loss.sum().backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match=r"target must have the leading shape of features \(2, 3, 5\)"):
        module(x, t.reshape(-1))
    with pytest.raises(ValueError, match=r"features must be \[\.\.\., 70\]"):
        module(torch.randn(4, 7, dtype=torch.float64), t[0, 0, :4])


def test_loading_own_state_dict_suggests_the_prefix():
    module = MatryoshkaLinearCrossEntropy(D, C, (3, 17, 70), shared=True)
    other = MatryoshkaLinearCrossEntropy(D, C, (3, 17, 70), shared=True)
    with pytest.raises(ValueError, match=r"prefix='head\.'"):
        other.load_mrl_linear_state_dict(module.state_dict())
    other.load_mrl_linear_state_dict(module.state_dict(), prefix="head.")
    assert torch.equal(other.head.nesting_classifier_0.weight, module.head.nesting_classifier_0.weight)
