"""Evaluation of nested representations: the paper's per-dim metrics."""
from __future__ import annotations

import torch

from .reference import nested_logits


@torch.no_grad()
def nested_accuracy(features, weight, target, dims, bias=None) -> list[float]:
    """Top-1 accuracy of the classifier at each nesting dim (linear classification, the paper's Table 1),
    in the order of `dims`."""
    return [(logits.argmax(1) == target).float().mean().item()
            for logits in nested_logits(features, weight, dims, bias)]
