"""Loading the paper's ResNet-50 checkpoints (github.com/RAIVNLab/MRL) into :func:`resnet50` models."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from ._base import MatryoshkaModel
from .vision import BlurPoolConv2d, ResNet50

_NESTED = re.compile(r"nesting_classifier_(\d+)\.(weight|bias)")


def load_paper_checkpoint(model: MatryoshkaModel, path_or_state_dict) -> MatryoshkaModel:
    """Loads a ResNet-50 checkpoint saved by the paper's code into ``model`` (from :func:`resnet50`) and
    returns it. Every key is checked before anything is copied; a mismatch raises ``ValueError`` naming it.

    The paper's checkpoints are torchvision ResNet-50 state dicts whose ``fc`` is one of (github.com/RAIVNLab/MRL,
    ``MRL.py``, ``utils.py``, ``train/train_imagenet.py``):

    - ``MRL_Linear_Layer(nesting_list, efficient=False)`` (or ``MultiHeadNestedLinear`` of the first release):
      ``fc.nesting_classifier_{i}.weight`` ``[C, m_i]`` and ``.bias``, one per dim -> ``mode="mrl"``, whose
      dims must be the same set (heads are matched by width, so any order);
    - ``MRL_Linear_Layer(nesting_list, efficient=True)``: ``fc.nesting_classifier_0.weight`` ``[C, 2048]``
      -> ``mode="mrl-e"`` with max(dims) equal to its width (the shared head serves any dims below it);
    - ``FixedFeatureLayer(d, C)`` (the FF baseline; for d = 2048 the plain ``fc``): ``fc.weight`` ``[C, d]``
      -> ``mode="ff"`` with ``dims=d``. ``SingleHeadNestedLinear``, the first release's MRL-E head, has the
      same keys at d = 2048, and loads into ``mode="mrl-e"`` too.

    Keys may carry DDP's ``module.`` prefix (the paper trained with DDP and strips it in ``get_ckpt``). The
    paper trains with BlurPool (``use_blurpool: 1``): such a checkpoint (keys ``...conv2.blur_filter``) needs
    ``resnet50(..., blurpool=True)``. ``path_or_state_dict``: a path to a ``torch.save``'d state dict (loaded
    on the CPU with ``weights_only=True``) or the state dict itself.
    """
    if not isinstance(model, MatryoshkaModel) or not isinstance(model.backbone, ResNet50):
        raise TypeError("model must be a ResNet-50 MatryoshkaModel (mrl_kernels.models.resnet50(...)): the paper's "
                        f"checkpoints are ResNet-50s; got {type(model).__name__}")
    state = _read(path_or_state_dict)
    head = {k[3:]: v for k, v in state.items() if k.startswith("fc.")}
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if not head:
        raise ValueError("the checkpoint has no fc.* keys: it is not the paper's layout (a ResNet-50 whose fc is "
                         f"MRL_Linear_Layer or FixedFeatureLayer); its first keys: {list(state)[:5]}")
    head_state = _head_state(model, head)
    _check_backbone(model, backbone)
    model.backbone.load_state_dict(backbone)
    model.head.head.load_state_dict(head_state)
    return model


def _read(path_or_state_dict) -> dict:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    else:
        state = path_or_state_dict
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise TypeError(f"path_or_state_dict must be a path or a state dict (str keys), got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _head_state(model: MatryoshkaModel, fc: dict) -> dict:
    """The checkpoint's fc tensors under the keys of ``model.head.head``, after checking that its layout is
    the model's mode (and its sizes the model's)."""
    nested = {k for k in fc if _NESTED.fullmatch(k)}
    unknown = sorted(set(fc) - nested - {"weight", "bias"})
    if unknown or (nested and len(nested) != len(fc)):
        raise ValueError(f"the checkpoint's fc has keys of no layout of the paper's: {sorted(f'fc.{k}' for k in fc)}")
    classes = {v.shape[0] for k, v in fc.items() if k.endswith("weight")}
    if classes != {model.num_classes}:
        raise ValueError(f"the checkpoint's fc has {sorted(classes)} classes, "
                         f"the model num_classes={model.num_classes}")
    if not nested:  # fc.weight [C, d]: FixedFeatureLayer(d), or the first release's MRL-E head at d = 2048
        width = _width(fc, "weight")
        if model.mode == "ff" and model.dims == (width,) or model.mode == "mrl-e" and model.embed_dim == width:
            return {f"nesting_classifier_0.{k}": v for k, v in fc.items()}
        also = " or mode='mrl-e' with max(dims)=2048 (the first release's MRL-E head)" if width == 2048 else ""
        raise ValueError(f"the checkpoint's fc is one [C, {width}] layer (fc.weight), a fixed-feature (FF) model: "
                         f"it loads into mode='ff' with dims={width}{also}, not this model (mode={model.mode!r}, "
                         f"dims={list(model.dims)})")
    heads = sorted({int(_NESTED.fullmatch(k).group(1)) for k in nested})
    if heads != list(range(len(heads))):
        raise ValueError(f"the checkpoint's fc.nesting_classifier_* heads are not numbered 0..{len(heads) - 1}: "
                         f"{heads}")
    widths = [_width(fc, f"nesting_classifier_{i}.weight") for i in heads]
    if model.mode == "mrl-e" and len(heads) == 1:
        if widths[0] != model.embed_dim:
            raise ValueError(f"the checkpoint's shared MRL-E head is [C, {widths[0]}]; the model's max(dims) is "
                             f"{model.embed_dim}: build it with dims ending at {widths[0]}")
        return fc
    if model.mode != "mrl" or sorted(widths) != sorted(model.dims):
        kind = "one shared head (MRL-E) or one MRL head" if len(heads) == 1 else "per-dim heads (MRL)"
        raise ValueError(f"the checkpoint's fc has {kind} of widths {widths}: it loads into mode='mrl' with dims "
                         f"{widths}" + (" or mode='mrl-e' with max(dims)=" + str(widths[0]) if len(heads) == 1 else "")
                         + f", not this model (mode={model.mode!r}, dims={list(model.dims)})")
    # Heads matched by width: the model's head j is the checkpoint's head of width dims[j].
    return {f"nesting_classifier_{model.dims.index(widths[i])}.{k.split('.', 1)[1]}": v
            for i in heads for k, v in fc.items() if k.startswith(f"nesting_classifier_{i}.")}


def _width(fc: dict, key: str) -> int:
    weight = fc.get(key)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"the checkpoint's fc.{key} must be a [C, d] weight, got "
                         f"{None if weight is None else tuple(weight.shape)}")
    return weight.shape[1]


def _check_backbone(model: MatryoshkaModel, state: dict) -> None:
    blurred = any(k.endswith(".blur_filter") for k in state)
    has_blur = any(isinstance(m, BlurPoolConv2d) for m in model.backbone.modules())
    if blurred != has_blur:
        raise ValueError("the checkpoint was trained with BlurPool (keys like 'layer2.0.conv2.blur_filter'): build "
                         "the model with resnet50(..., blurpool=True)" if blurred else
                         "the checkpoint has no BlurPool layers: build the model with resnet50(..., blurpool=False)")
    expected = model.backbone.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the checkpoint's backbone keys differ from ResNet-50's: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"the checkpoint's backbone has other shapes than the model's: {wrong[:5]}")
