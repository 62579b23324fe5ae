"""training: ResNet-50 training steps (forward, backward, SGD step) with the paper's three heads, the fused
head of mrl_kernels.models.resnet50 against the paper's head and loss (github.com/RAIVNLab/MRL, MRL.py).

Cases, one per mode: mrl (one head per dim), mrl-e (shared head), ff (the fixed-feature baseline at d = 2048,
i.e. a plain ResNet-50 step: the floor that MRL's extra heads are read against); dims (8, 16, ..., 2048),
1000 classes, label smoothing 0.1 (the paper's recipe). CUDA: synthetic ImageNet-shaped batches, 256 images of
224 x 224, channels_last, bf16 autocast (the paper's code autocasts in fp16 with a GradScaler; bf16 needs
none). CPU: only the quick case (2 images of 32 x 32, fp32), so the harness's tests can run the suite.
images/s = the case's `batch` / median seconds.

Providers (the same initial weights, from seed 0):
  paper  the baseline: the backbone, then the paper's MRL_Linear_Layer (a tuple of logits) and
         Matryoshka_CE_Loss, re-implemented below as in MRL.py; for ff its FixedFeatureLayer and
         nn.CrossEntropyLoss, as its train_imagenet.py does.
  ours   mrl_kernels.models.resnet50(mode): the backbone, then MatryoshkaLinearCrossEntropy (the fused loss,
         backend "auto"; no logits built).
Both step SGD (momentum 0.9, weight decay 1e-4, as in the paper's recipe) with lr = 0: the step does all of
its work (torch's SGD does not skip a zero rate), and the weights stay put, so every rep sees the same model
and rel err compares the two losses on the same batch.

FLOPs: 3x the backbone's forward (8.17 GFLOPs per 224 x 224 image, counted by torch's FlopCounterMode,
scaled by the pixel count) plus 6 * N * C * 2048 for one full-width head: the useful work of a plain step.
Bytes: the images once, and the fp32 parameters read twice, gradients written, then parameters, gradients and
momentum read and parameters and momentum written by the step: a lower bound.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bench.harness import Case, Suite, require

BACKBONE_FLOPS_224 = 8_174_272_512  # FlopCounterMode on one 224 x 224 image (2 FLOPs per multiply-add)
BACKBONE_PARAMS = 23_508_032  # torchvision's resnet50 less its fc
DIMS = tuple(8 << i for i in range(9))
CLASSES = 1000
LABEL_SMOOTHING = 0.1
MODES = ("mrl", "mrl-e", "ff")


def _case(mode: str, batch: int, res: int, dtype: str) -> Case:
    dims = (2048,) if mode == "ff" else DIMS
    flops = 3 * BACKBONE_FLOPS_224 * batch * res**2 / 224**2 + 6 * batch * CLASSES * 2048
    head_params = CLASSES * (sum(dims) if mode == "mrl" else 2048) + CLASSES * (len(dims) if mode == "mrl" else 1)
    moved = batch * 3 * res * res * 2 + 4 * (BACKBONE_PARAMS + head_params) * 8
    short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    return Case(f"{mode}-B{batch}-{res}px-{short}", {"mode": mode, "batch": batch, "res": res, "dims": list(dims),
                                                     "classes": CLASSES, "dtype": dtype},
                flops=flops, bytes=moved)


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        return [_case(mode, 8, 64, "bfloat16") if quick else _case(mode, 256, 224, "bfloat16") for mode in MODES]
    return [_case(mode, 2, 32, "float32") for mode in MODES] if quick else []


def make_inputs(case: Case, device: str, seed: int) -> tuple:
    p = case.params
    gen = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(p["batch"], 3, p["res"], p["res"], generator=gen, device=device)
    target = torch.randint(0, p["classes"], (p["batch"],), generator=gen, device=device)
    return images.contiguous(memory_format=torch.channels_last), target


# ---- the paper's head and loss (github.com/RAIVNLab/MRL, MRL.py), as its training code runs them ----------


class MRLLinearLayer(nn.Module):
    """MRL_Linear_Layer: one nn.Linear per dim, or one shared (efficient=True), a tuple of logits."""

    def __init__(self, nesting_list, num_classes, efficient=False):
        super().__init__()
        self.nesting_list, self.efficient = list(nesting_list), efficient
        widths = [self.nesting_list[-1]] if efficient else self.nesting_list
        for i, m in enumerate(widths):
            setattr(self, f"nesting_classifier_{i}", nn.Linear(m, num_classes))

    def forward(self, x):
        if self.efficient:
            head = self.nesting_classifier_0
            return tuple(torch.matmul(x[:, :m], head.weight[:, :m].t()) + head.bias for m in self.nesting_list)
        return tuple(getattr(self, f"nesting_classifier_{i}")(x[:, :m]) for i, m in enumerate(self.nesting_list))


class MatryoshkaCELoss(nn.Module):
    """Matryoshka_CE_Loss: one nn.CrossEntropyLoss per tuple entry, stacked and summed."""

    def __init__(self, **kwargs):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(**kwargs)

    def forward(self, output, target):
        return torch.stack([self.criterion(logits, target) for logits in output]).sum()


class FixedFeatureLayer(nn.Linear):
    """FixedFeatureLayer: a Linear(d, C) on the first d features."""

    def forward(self, x):
        return torch.matmul(x[:, :self.in_features], self.weight.t()) + self.bias


# ---- providers -----------------------------------------------------------------------------------------------


def _ours_model(case: Case, device: str):
    models = require("mrl_kernels.models")
    p = case.params
    torch.manual_seed(0)
    dims = 2048 if p["mode"] == "ff" else tuple(p["dims"])
    model = models.resnet50(p["mode"], num_classes=p["classes"], dims=dims, label_smoothing=LABEL_SMOOTHING)
    return model.to(device, memory_format=torch.channels_last).train()


def _stepper(case: Case, device: str, model: nn.Module, loss_fn):
    """fn(images, target) -> the detached loss of one training step of `model` under loss_fn."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)
    dtype = getattr(torch, case.params["dtype"])

    def step(images, target):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(images, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    return step


def _ours(case: Case, device: str):
    model = _ours_model(case, device)
    return _stepper(case, device, model, model)


def _paper(case: Case, device: str):
    ours = _ours_model(case, device)
    p = case.params
    if p["mode"] == "ff":
        fc, criterion = FixedFeatureLayer(2048, p["classes"]), nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    else:
        fc = MRLLinearLayer(p["dims"], p["classes"], efficient=p["mode"] == "mrl-e")
        criterion = MatryoshkaCELoss(label_smoothing=LABEL_SMOOTHING)
    # The same head weights as ours: our head has the official layer's keys (ff: nesting_classifier_0.*).
    head = ours.head.head.state_dict()
    fc.load_state_dict({k.split(".", 1)[1]: v for k, v in head.items()} if p["mode"] == "ff" else head)
    model = nn.Sequential(ours.backbone, fc.to(device)).train()
    return _stepper(case, device, model, lambda images, target: criterion(model(images), target))


SUITE = Suite(name="training", baseline="paper", cases=cases, make_inputs=make_inputs,
              providers={"paper": _paper, "ours": _ours}, metric="TFLOP/s")
