"""Image models: the paper's ResNet-50 and ViT-B/16 and a small CNN for 28x28 images (Fashion-MNIST) that
trains in seconds on a CPU.

ResNet-50 and ViT-B/16 are torchvision's architectures written out here, with torchvision's module names
(so their state dicts, the paper's checkpoints and torchvision's weights load as they are) and its default
initialisation. Why not import torchvision: its PyPI wheels link CUDA (torchvision 0.28.0's _C.so needs
libc10_cuda.so), so with the CPU build of torch that scripts/setup.sh installs, `import torchvision` fails
(operator torchvision::nms does not exist), and the CPU wheels live on download.pytorch.org only.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._validation import check_int
from ._base import MatryoshkaModel, check_mode_and_dims, default_dims

# The paper's nesting lists (arXiv 2205.13147, Sec. 4): powers of two from 8 up to ResNet-50's 2048 features
# (train_imagenet.py: nesting_list = [2**i for i in range(3, 12)]); ViT-B/16 and BERT-Base, 768 features,
# halve from 768 down to 12.
RESNET50_DIMS = tuple(2**i for i in range(3, 12))
VIT_BERT_DIMS = (12, 24, 48, 96, 192, 384, 768)
SMALL_CONVNET_DIMS = (2, 4, 8, 16, 32, 64)


class BlurPoolConv2d(nn.Module):
    """The paper's BlurPool wrapper (train_imagenet.py and utils.py, from FFCV's ImageNet recipe): a fixed
    3x3 binomial blur, depthwise, before a strided convolution. Its state dict keys (``conv.weight``,
    ``blur_filter``) are the paper's, so its checkpoints load."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        binomial = torch.tensor([[[[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]]]) / 16.0
        self.register_buffer("blur_filter", binomial.repeat(conv.in_channels, 1, 1, 1))

    def forward(self, x):
        blurred = F.conv2d(x, self.blur_filter, stride=1, padding=(1, 1), groups=self.conv.in_channels)
        return self.conv(blurred)


def apply_blurpool(module: nn.Module) -> nn.Module:
    """Wraps every strided conv with >= 16 input channels in BlurPoolConv2d, as the paper's apply_blurpool
    does (in ResNet-50: the 3x3 conv and the downsampling conv of the first block of layers 2-4)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        else:
            apply_blurpool(child)
    return module


# ---- ResNet-50 (torchvision.models.resnet50: v1.5, the stride on the 3x3 conv) ------------------------------


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck block (1x1, 3x3 with the stride, 1x1 to 4x the width) and its names."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 up to its pooled 2048 features (no ``fc``): the same module names and
    initialisation (Kaiming-normal convs, fan-out; batch norms at weight 1, bias 0)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
            layer = [Bottleneck(inplanes, planes, stride, downsample)]
            layer += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes * 4
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


# ---- ViT-B/16 (torchvision.models.vit_b_16) -----------------------------------------------------------------


class MLPBlock(nn.Sequential):
    """torchvision's transformer MLP (Linear, GELU, Dropout, Linear, Dropout: keys mlp.0 and mlp.3)."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float):
        super().__init__(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                         nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """A pre-norm transformer block, as torchvision's (layer norms at eps 1e-6)."""

    def __init__(self, num_heads: int, dim: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim, dropout)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.dropout(self.self_attention(y, y, y, need_weights=False)[0])
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, dim: int, mlp_dim: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, dim, mlp_dim)) for i in range(num_layers)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class ViTB16(nn.Module):
    """torchvision's ViT-B/16 (patch 16, 12 layers, 12 heads, width 768, MLP 3072) up to the 768-d class token
    (no ``heads``), with its module names and initialisation."""

    patch_size, hidden_dim = 16, 768

    def __init__(self, image_size: int = 224):
        super().__init__()
        self.image_size = image_size
        self.conv_proj = nn.Conv2d(3, 768, kernel_size=16, stride=16)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 768))
        self.encoder = Encoder((image_size // 16) ** 2 + 1, num_layers=12, num_heads=12, dim=768, mlp_dim=3072)
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (3 * 16 * 16)))
        nn.init.zeros_(self.conv_proj.bias)

    def forward(self, x):
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"x must be [N, 3, {self.image_size}, {self.image_size}] (image_size), got "
                             f"{tuple(x.shape)}")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [N, patches, 768]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.encoder(x)[:, 0]


def _load_weights(net: nn.Module, weights, classifier: str) -> None:
    """Loads torchvision weights into net: a state dict of the torchvision model, or a torchvision weights
    enum (anything with get_state_dict(), which downloads them); the 1000-class ``classifier`` is dropped."""
    if hasattr(weights, "get_state_dict"):
        weights = weights.get_state_dict(progress=True)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a torchvision weights enum or a state dict, got {type(weights).__name__}")
    net.load_state_dict({k: v for k, v in weights.items() if not k.startswith(classifier + ".")})


def resnet50(mode: str = "mrl", num_classes: int = 1000, dims=None, *, weights=None, blurpool: bool = False,
             **head_options) -> MatryoshkaModel:
    """ResNet-50 (torchvision's architecture) with a Matryoshka head on its 2048 pooled features.

    ``mode``: ``"mrl"`` (one head per dim), ``"mrl-e"`` (shared head) or ``"ff"`` (the fixed-feature
    baseline: ``dims`` is its size d, required; the head reads the first d of the 2048 features, as the
    paper's ``FixedFeatureLayer`` in github.com/RAIVNLab/MRL ``MRL.py`` does, so the backbone is the same
    network for every d). ``dims`` defaults to the paper's (8, 16, ..., 2048). ``weights``: None (random
    init, nothing downloaded), a state dict of torchvision's resnet50 or a torchvision weights enum (its
    ``fc`` is dropped). ``blurpool=True`` adds the paper's BlurPool (its training recipe, ``use_blurpool:
    1``), which its checkpoints need. ``head_options`` go to the head (``label_smoothing``, ``dim_weights``,
    ``backend``, ...).
    """
    mode, dims = check_mode_and_dims(mode, default_dims(dims, mode, RESNET50_DIMS), 2048)

    def backbone():
        net = ResNet50()
        if weights is not None:
            _load_weights(net, weights, "fc")
        return apply_blurpool(net) if blurpool else net

    return MatryoshkaModel(backbone, 2048, num_classes, dims, mode, **head_options)


def vit_b_16(mode: str = "mrl", num_classes: int = 1000, dims=None, *, weights=None, image_size: int = 224,
             **head_options) -> MatryoshkaModel:
    """ViT-B/16 (torchvision's architecture) with a Matryoshka head on its 768-d class token.

    ``dims`` defaults to the paper's (12, 24, 48, 96, 192, 384, 768); for ``"ff"`` it is the size d
    (required), the head reading the first d features as for ResNet-50. ``weights``: None (random init), a
    state dict of torchvision's vit_b_16 or a torchvision weights enum (its ``heads`` are dropped; their
    image size must be ``image_size``). ``image_size`` (a multiple of 16) sizes the position embeddings."""
    mode, dims = check_mode_and_dims(mode, default_dims(dims, mode, VIT_BERT_DIMS), 768)
    image_size = check_int(image_size, "image_size", 16)
    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of the patch size 16, got {image_size}")

    def backbone():
        net = ViTB16(image_size)
        if weights is not None:
            _load_weights(net, weights, "heads")
        return net

    return MatryoshkaModel(backbone, 768, num_classes, dims, mode, **head_options)


class SmallConvNet(nn.Module):
    """Three 3x3 convs with stride 2 (16, 32, 64 channels; batch norm, ReLU): 28 -> 14 -> 7 -> 4 pixels, then a
    linear map of the 64 x 4 x 4 maps to the ``feature_dim``-d representation. Strided convs rather than
    pooling: on a CPU the full-resolution maps and the pooling over them cost more than the convs."""

    def __init__(self, in_channels: int = 1, feature_dim: int = 64):
        super().__init__()
        layers, width = [], in_channels
        for out in (16, 32, 64):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            width = out
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(64 * 4 * 4, feature_dim)

    def forward(self, x):
        return self.embed(self.features(x).flatten(1))


def small_convnet(mode: str = "mrl", num_classes: int = 10, dims=None, *, in_channels: int = 1,
                  feature_dim: int = 64, **head_options) -> MatryoshkaModel:
    """A small CNN for 28x28 images (Fashion-MNIST, MNIST) with a ``feature_dim``-d (64) representation and
    dims (2, 4, 8, 16, 32, 64) by default; for ``"ff"``, ``dims`` is the size d and the head reads the first d
    features, as the paper's ResNet-50 FF models do. About 1.2 MFLOPs per image forward: an epoch of 60,000
    images trains in seconds on two CPU cores, so a demo can train MRL, MRL-E and one FF model per d."""
    in_channels = check_int(in_channels, "in_channels", 1)
    feature_dim = check_int(feature_dim, "feature_dim", 1)
    nesting = tuple(m for m in SMALL_CONVNET_DIMS if m < feature_dim) + (feature_dim,)
    mode, dims = check_mode_and_dims(mode, default_dims(dims, mode, nesting), feature_dim)
    return MatryoshkaModel(lambda: SmallConvNet(in_channels, feature_dim), feature_dim, num_classes, dims, mode,
                           **head_options)
