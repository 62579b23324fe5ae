"""The paper's models with Matryoshka heads (arXiv 2205.13147; github.com/RAIVNLab/MRL).

Each constructor returns a :class:`MatryoshkaModel`: a backbone and a
:class:`mrl_kernels.nn.MatryoshkaLinearCrossEntropy` head in one of three modes, ``"mrl"`` (one head per
nesting dim), ``"mrl-e"`` (one shared head) or ``"ff"`` (the fixed-feature baseline of size d):

- :func:`resnet50` and :func:`vit_b_16` (torchvision's architectures and module names, no torchvision needed);
- :func:`bert_base` (transformers: ``pip install 'mrl-kernels[text]'``);
- :func:`small_convnet`, a CNN for 28x28 images that trains on a CPU in seconds.

:func:`load_paper_checkpoint` loads the paper's released ResNet-50 checkpoints into :func:`resnet50`.

Example::

    >>> from mrl_kernels import models
    >>> model = models.resnet50("mrl", num_classes=1000)         # dims (8, 16, ..., 2048)
    >>> loss = model(images, labels)                             # fused loss over every dim
    >>> z = model.embed(images)                                  # [N, 2048]; z[:, :64] is the 64-d representation
    >>> pred = model.logits(images, dim=64).argmax(1)
"""
from ._base import MODES, MatryoshkaModel
from .checkpoint import load_paper_checkpoint
from .text import bert_base
from .vision import RESNET50_DIMS, SMALL_CONVNET_DIMS, VIT_BERT_DIMS, resnet50, small_convnet, vit_b_16

__all__ = ["MODES", "MatryoshkaModel", "RESNET50_DIMS", "SMALL_CONVNET_DIMS", "VIT_BERT_DIMS", "bert_base",
           "load_paper_checkpoint", "resnet50", "small_convnet", "vit_b_16"]
