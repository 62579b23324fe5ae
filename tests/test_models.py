"""mrl_kernels.models: the paper's models in their three head modes, and the paper's checkpoints."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mrl_kernels import models
from mrl_kernels.models.vision import BlurPoolConv2d, ResNet50, apply_blurpool


def eager_loss(model, x, target, dim_weights=None, label_smoothing=0.0):
    """sum_j w_j * CE(z[:, :m_j] @ W_j^T + b_j): the per-dim loop, written from the head's parameters."""
    z = model.features(x)
    heads = model.head.head.heads()
    per_dim = []
    for j, m in enumerate(model.dims):
        lin = heads[0 if model.mode == "mrl-e" else j]
        per_dim.append(F.cross_entropy(z[:, :m] @ lin.weight[:, :m].T + lin.bias, target,
                                       label_smoothing=label_smoothing))
    weights = dim_weights or [1.0] * len(per_dim)
    return sum(w * l for w, l in zip(weights, per_dim)), torch.stack(per_dim)


@pytest.mark.parametrize("mode,dims", [("mrl", (2, 8, 4, 64)), ("mrl-e", (4, 16, 64)), ("ff", 8)])
def test_small_convnet_modes_shapes_and_loss(mode, dims):
    torch.manual_seed(0)
    model = models.small_convnet(mode, num_classes=10, dims=dims, label_smoothing=0.1, dim_weights=None)
    x, target = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    d = (dims,) if isinstance(dims, int) else dims
    assert (model.mode, model.dims, model.num_classes, model.embed_dim) == (mode, d, 10, max(d))
    z = model.embed(x)
    assert z.shape == (5, max(d)) and torch.equal(z, model.features(x)[:, :max(d)])
    assert model.logits(x).shape == (5, 10) and model.logits(x, dim=d[0]).shape == (5, 10)
    loss, per_dim = model(x, target, return_per_dim=True)
    want, want_per_dim = eager_loss(model, x, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(per_dim, want_per_dim)
    loss.backward()  # the backbone gets gradients through the fused head
    assert model.backbone.embed.weight.grad.abs().sum() > 0


def test_small_convnet_defaults_and_ff_reads_the_first_d_features():
    assert models.small_convnet().dims == (2, 4, 8, 16, 32, 64) == models.SMALL_CONVNET_DIMS
    assert models.small_convnet(feature_dim=128).dims == (2, 4, 8, 16, 32, 64, 128)
    torch.manual_seed(1)
    ff = models.small_convnet("ff", dims=(4,), in_channels=3)
    x = torch.randn(3, 3, 28, 28)
    head = ff.head.head.nesting_classifier_0
    assert head.weight.shape == (10, 4)  # Linear(d, C), as the paper's FixedFeatureLayer(d, C)
    torch.testing.assert_close(ff.logits(x), ff.features(x)[:, :4] @ head.weight.T + head.bias)
    assert ff.embed(x).shape == (3, 4)


def test_mrl_e_logits_at_any_dim_and_dim_weights_pass_through():
    torch.manual_seed(2)
    model = models.small_convnet("mrl-e", dims=(8, 32, 64), dim_weights=[0.5, 1.0, 2.0])
    x, target = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    w, b = model.head.head.nesting_classifier_0.weight, model.head.head.nesting_classifier_0.bias
    torch.testing.assert_close(model.logits(x, dim=5), model.features(x)[:, :5] @ w[:, :5].T + b)
    torch.testing.assert_close(model(x, target), eager_loss(model, x, target, dim_weights=[0.5, 1.0, 2.0])[0])


def test_small_convnet_flops_per_image():
    """What keeps a 60,000-image epoch to seconds on two cores: multiply-adds of the three stride-2 3x3 convs
    (outputs 14, 7 and 4 pixels square) and of the 1024 -> 64 linear map, 2 FLOPs each."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models.small_convnet()
    with FlopCounterMode(display=False) as counter:
        model.features(torch.randn(1, 1, 28, 28))
    macs = 14 * 14 * 16 * 9 * 1 + 7 * 7 * 32 * 9 * 16 + 4 * 4 * 64 * 9 * 32 + 1024 * 64
    assert counter.get_total_flops() == 2 * macs


@pytest.fixture(scope="module")
def paper_backbone():
    """One ResNet-50 backbone (built once: a build costs seconds here) with non-trivial batch-norm statistics,
    so that a mix-up of tensors shows; eval mode. Also the same with the paper's BlurPool."""
    torch.manual_seed(6)
    net = ResNet50()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 1.5)
    return net.eval(), apply_blurpool(copy.deepcopy(net)).eval()


def built_on_meta(build, *args, **kwargs):
    """A model from `build` without initialising it (on the meta device, then empty CPU tensors): the caller
    fills every tensor."""
    with torch.device("meta"):
        model = build(*args, **kwargs)
    return model.to_empty(device="cpu")


@pytest.mark.parametrize("mode", ["mrl", "mrl-e", "ff"])
def test_resnet50_modes_at_32px(mode, paper_backbone):
    dims = 16 if mode == "ff" else None
    model = built_on_meta(models.resnet50, mode, num_classes=7, dims=dims)
    assert model.dims == ((16,) if mode == "ff" else models.RESNET50_DIMS)
    assert models.RESNET50_DIMS == (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    # torchvision's resnet50 has 25,557,032 parameters, 2,049,000 of them in its 1000-class fc.
    assert sum(p.numel() for p in model.backbone.parameters()) == 25_557_032 - 2_049_000
    model.backbone.load_state_dict(paper_backbone[0].state_dict())
    torch.manual_seed(3)
    model.head.head.reset_parameters()
    model.train()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 6])
    assert model.embed(x).shape == (2, model.embed_dim)
    assert model.logits(x, dim=model.dims[0]).shape == (2, 7)
    torch.testing.assert_close(model(x, target), eager_loss(model, x, target)[0])


def test_vit_b_16_structure_and_forward():
    with torch.device("meta"):  # the default, 224 x 224, without the cost of initialising it
        vit = models.vit_b_16("mrl")
    assert vit.dims == models.VIT_BERT_DIMS == (12, 24, 48, 96, 192, 384, 768)
    # torchvision's vit_b_16 has 86,567,656 parameters, 769,000 of them in its 1000-class head.
    assert sum(p.numel() for p in vit.backbone.parameters()) == 86_567_656 - 769_000
    assert vit.backbone.encoder.pos_embedding.shape == (1, 197, 768)
    torch.manual_seed(4)
    small = models.vit_b_16("mrl-e", num_classes=5, image_size=32)  # 4 patches + the class token
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 4])
    assert small.embed(x).shape == (2, 768) and small.logits(x, dim=100).shape == (2, 5)
    torch.testing.assert_close(small(x, target), eager_loss(small, x, target)[0])
    with pytest.raises(ValueError, match="image_size"):
        small.embed(torch.randn(1, 3, 48, 48))


def test_bert_base_mlm_and_classification():
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        bert = models.bert_base("mrl")
    assert bert.dims == models.VIT_BERT_DIMS and bert.num_classes == 30522 and bert.feature_dim == 768
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(5)
    mlm = models.bert_base("mrl", dims=(4, 8, 32), config=config).eval()
    assert mlm.num_classes == 50
    ids = torch.randint(0, 50, (2, 6))
    labels = torch.full((2, 6), -100).index_put_((torch.tensor([0, 1]), torch.tensor([2, 5])), torch.tensor([7, 9]))
    h = mlm.features({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert h.shape == (2, 6, 32) and mlm.logits(ids, dim=8).shape == (2, 6, 50)
    want = sum(F.cross_entropy(head(h[..., :m]).reshape(-1, 50), labels.reshape(-1))
               for head, m in zip(mlm.head.head.heads(), mlm.dims))
    torch.testing.assert_close(mlm(ids, labels), want)
    cls = models.bert_base("ff", num_classes=3, dims=16, task="classification", config=config).eval()
    z = cls.embed(ids)
    assert z.shape == (2, 16) and torch.equal(z, cls.backbone.bert(input_ids=ids).last_hidden_state[:, 0, :16])
    with pytest.raises(ValueError, match="num_classes is required"):
        models.bert_base("mrl", task="classification", config=config)
    with pytest.raises(ValueError, match="task"):
        models.bert_base(task="nsp")
    with pytest.raises(TypeError, match="config"):
        models.bert_base(config={"hidden_size": 32})


def test_argument_errors_come_before_the_backbone_is_built(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the backbone was built before the arguments were checked")

    monkeypatch.setattr(models.vision, "ResNet50", no_build)
    monkeypatch.setattr(models.vision, "ViTB16", no_build)
    cases = [
        (dict(mode="mrl-x"), ValueError, "mode must be one of"),
        (dict(mode="ff"), ValueError, "dims is required for mode='ff'"),
        (dict(mode="ff", dims=(8, 16)), ValueError, "one int"),
        (dict(dims=(8, 4096)), ValueError, "backbone's feature size"),
        (dict(dims=(8, 8)), ValueError, "dims"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
        (dict(shared=True), TypeError, "shared is not a head option"),
        (dict(temperature=1.0), TypeError, "unknown head option"),
    ]
    for kwargs, error, match in cases:
        for build in (models.resnet50, models.vit_b_16):
            with pytest.raises(error, match=match):
                build(**kwargs)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        models.vit_b_16(image_size=40)


def test_logits_dim_errors():
    model = models.small_convnet("mrl", dims=(4, 16, 64))
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(ValueError, match=r"dim must be one of dims \[4, 16, 64\]"):
        model.logits(x, dim=8)
    with pytest.raises(ValueError, match=r"dim must be in \[1, 64\]"):
        models.small_convnet("mrl-e").logits(x, dim=65)
    with pytest.raises(ValueError, match="dim must be one of dims"):
        models.small_convnet("ff", dims=8).logits(x, dim=4)
    with pytest.raises(TypeError, match="backbone"):
        models.MatryoshkaModel("resnet", 64, 10, (8,))


# ---- the paper's checkpoints ----------------------------------------------------------------------------
# The paper's heads (github.com/RAIVNLab/MRL, MRL.py and utils.py), re-implemented for their key layout and
# their computation; the checkpoint tests compare our logits with theirs.


class MRLLinearLayer(nn.Module):
    def __init__(self, nesting_list, num_classes, efficient=False):
        super().__init__()
        self.nesting_list, self.efficient = nesting_list, efficient
        widths = [nesting_list[-1]] if efficient else nesting_list
        for i, m in enumerate(widths):
            setattr(self, f"nesting_classifier_{i}", nn.Linear(m, num_classes))

    def forward(self, x):
        if self.efficient:
            w, b = self.nesting_classifier_0.weight, self.nesting_classifier_0.bias
            return tuple(x[:, :m] @ w[:, :m].T + b for m in self.nesting_list)
        return tuple(getattr(self, f"nesting_classifier_{i}")(x[:, :m]) for i, m in enumerate(self.nesting_list))


class FixedFeatureLayer(nn.Linear):
    def forward(self, x):
        return x[:, :self.in_features] @ self.weight.T + self.bias


class SingleHeadNestedLinear(nn.Linear):
    """The first release's MRL-E head (utils.py): an nn.Linear, so its keys are fc.weight and fc.bias."""

    def __init__(self, nesting_list, num_classes):
        super().__init__(nesting_list[-1], num_classes)
        self.nesting_list = nesting_list

    def forward(self, x):
        return tuple(x[:, :m] @ self.weight[:, :m].T + self.bias for m in self.nesting_list)


NESTING = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]


@pytest.mark.parametrize("mode,fc,prefix,blurpool", [
    ("mrl", lambda: MRLLinearLayer(NESTING, 5), "module.", True),
    ("mrl-e", lambda: MRLLinearLayer(NESTING, 5, efficient=True), "", False),
    ("mrl-e", lambda: SingleHeadNestedLinear(NESTING, 5), "module.", False),
    ("ff", lambda: FixedFeatureLayer(64, 5), "", True),
])
def test_paper_checkpoints_load_into_their_mode(tmp_path, paper_backbone, mode, fc, prefix, blurpool):
    """The paper's model is its backbone (torchvision's ResNet-50, the same module names as ours; BlurPool in
    its recipe) with `fc` replaced; its state dict, saved with or without DDP's prefix, fills our model."""
    torch.manual_seed(7)
    backbone, fc = paper_backbone[int(blurpool)], fc()
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    state.update({f"{prefix}fc.{k}": v for k, v in fc.state_dict().items()})
    # Our dims in another order than the paper's (mrl), or other dims under the same width (mrl-e).
    dims = 64 if mode == "ff" else NESTING[::-1] if mode == "mrl" else (8, 100, 2048)
    model = built_on_meta(models.resnet50, mode, num_classes=5, dims=dims, blurpool=blurpool)
    if mode == "ff":  # from a file, as the paper's code saves it
        torch.save(state, tmp_path / "ckpt.pt")
        state = tmp_path / "ckpt.pt"
    # The paper's BlurPool wraps the strided convs of >= 16 channels: the first block's 3x3 and downsampling
    # convs in layers 2-4.
    blurred = [name for name, m in model.backbone.named_modules() if isinstance(m, BlurPoolConv2d)]
    assert blurred == ([f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0")] if blurpool else [])
    assert models.load_paper_checkpoint(model, state) is model
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z = backbone(x)
        torch.testing.assert_close(model.features(x), z)
        theirs = fc(z)
        if mode == "ff":
            torch.testing.assert_close(model.logits(x), theirs)
            return
        torch.testing.assert_close(model.logits(x, dim=16), theirs[1])
        for m in NESTING:  # the head on the backbone's features: one backbone pass for every dim
            torch.testing.assert_close(model.head.logits(z, dim=m), theirs[NESTING.index(m)])
        if mode == "mrl-e":  # a dim outside the paper's list: the first 100 columns of the shared head
            shared = fc if isinstance(fc, nn.Linear) else fc.nesting_classifier_0
            want = z[:, :100] @ shared.weight[:, :100].T + shared.bias
            torch.testing.assert_close(model.head.logits(z, dim=100), want)


@pytest.fixture(scope="module")
def mrl_state(paper_backbone):
    state = {"module." + k: v for k, v in paper_backbone[0].state_dict().items()}
    state.update({"module.fc." + k: v for k, v in MRLLinearLayer(NESTING, 5).state_dict().items()})
    return state


def test_paper_checkpoint_mismatches_are_named(mrl_state):
    def load(state, mode="mrl", dims=None, num_classes=5, blurpool=False):
        return models.load_paper_checkpoint(
            built_on_meta(models.resnet50, mode, num_classes=num_classes, dims=dims, blurpool=blurpool), state)

    with pytest.raises(ValueError, match=r"per-dim heads \(MRL\).*mode='mrl' with dims \[8, 16"):
        load(mrl_state, "mrl-e")
    with pytest.raises(ValueError, match="not this model"):
        load(mrl_state, "mrl", dims=(8, 16, 32))
    with pytest.raises(ValueError, match=r"5\] classes, the model num_classes=1000"):
        load(mrl_state, num_classes=1000)
    with pytest.raises(ValueError, match="blurpool=True"):
        load({**mrl_state, "module.layer2.0.conv2.blur_filter": torch.ones(128, 1, 3, 3)})
    with pytest.raises(ValueError, match="no BlurPool"):
        load(mrl_state, blurpool=True)
    missing = {k: v for k, v in mrl_state.items() if k != "module.layer1.0.bn1.running_mean"}
    with pytest.raises(ValueError, match=r"missing \['layer1.0.bn1.running_mean'\]"):
        load(missing)
    with pytest.raises(ValueError, match="no fc"):
        load({k: v for k, v in mrl_state.items() if ".fc." not in k})
    shared = {k: v for k, v in mrl_state.items() if ".fc." not in k}
    shared.update({"fc.nesting_classifier_0.weight": torch.zeros(5, 2048),
                   "fc.nesting_classifier_0.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="MRL-E"):
        load(shared, "mrl")
    with pytest.raises(ValueError, match="max\\(dims\\) is 1024"):
        load(shared, "mrl-e", dims=(8, 1024))
    ff = {k: v for k, v in shared.items() if ".fc." not in k and not k.startswith("fc.")}
    ff.update({"fc.weight": torch.zeros(5, 64), "fc.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match="fixed-feature.*mode='ff' with dims=64"):
        load(ff, "ff", dims=32)
    with pytest.raises(ValueError, match="fixed-feature"):
        load(ff, "mrl")
    with pytest.raises(TypeError, match="ResNet-50"):
        models.load_paper_checkpoint(models.small_convnet(), ff)
    with pytest.raises(TypeError, match="path or a state dict"):
        models.load_paper_checkpoint(built_on_meta(models.resnet50), [1, 2])
