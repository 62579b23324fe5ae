"""BERT-Base with a Matryoshka head (transformers, the `text` extra)."""
from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch.nn as nn
from torch import Tensor

from ._base import MatryoshkaModel, check_mode_and_dims, default_dims
from .vision import VIT_BERT_DIMS

TASKS = ("mlm", "classification")


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ModuleNotFoundError:
        raise ImportError("bert_base needs transformers: pip install 'mrl-kernels[text]'") from None


class BertEncoder(nn.Module):
    """A ``transformers.BertModel`` (no pooler) as a backbone: input ids ``[N, L]``, or a mapping of the model's
    inputs (``input_ids``, ``attention_mask``, ``token_type_ids``, e.g. a tokenizer's output) -> the last
    hidden states ``[N, L, hidden]``, or with ``cls=True`` the [CLS] token's ``[N, hidden]``."""

    def __init__(self, bert: nn.Module, cls: bool):
        super().__init__()
        self.bert, self.cls = bert, cls

    def forward(self, x):
        if isinstance(x, Tensor):
            x = {"input_ids": x}
        elif not isinstance(x, Mapping):
            raise TypeError(f"x must be input ids (a tensor) or a mapping of BERT's inputs, got {type(x).__name__}")
        hidden = self.bert(**x).last_hidden_state
        return hidden[:, 0] if self.cls else hidden


def bert_base(mode: str = "mrl", num_classes: int | None = None, dims=None, *, task: str = "mlm", config=None,
              **head_options) -> MatryoshkaModel:
    """BERT-Base (``transformers.BertModel`` built from a config: random init, nothing downloaded) with a
    Matryoshka head on its hidden states.

    ``task="mlm"`` (default; the paper's BERT experiment is masked language modelling, arXiv 2205.13147):
    the head classifies every token over the vocabulary (``num_classes`` defaults to ``config.vocab_size``);
    ``forward(input_ids, labels)`` takes labels ``[N, L]`` with ``ignore_index`` (-100) at unmasked tokens,
    ``embed`` and ``logits`` return per-token ``[N, L, ...]``. The head reads the hidden states directly:
    BERT's own MLM transform (a dense layer and layer norm over all 768 features) would mix the prefixes that
    MRL nests, and its decoder tied to the input embeddings has one width; neither is used here.
    ``task="classification"``: the head reads the [CLS] token's hidden state ``[N, 768]``; ``num_classes`` is
    required.

    ``dims`` defaults to the paper's (12, 24, 48, 96, 192, 384, 768); for ``"ff"`` it is the size d
    (required). ``config``: a ``transformers.BertConfig`` (default: ``BertConfig()``, BERT-Base's sizes).
    Inputs are input ids ``[N, L]`` or a mapping of BertModel's inputs (a tokenizer's output).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    transformers = _transformers()
    if config is None:
        config = transformers.BertConfig()
    elif not isinstance(config, transformers.BertConfig):
        raise TypeError(f"config must be a transformers.BertConfig, got {type(config).__name__}")
    width = config.hidden_size
    nesting = tuple(m for m in VIT_BERT_DIMS if m < width) + (width,)  # the paper's list, cut to a smaller width
    mode, dims = check_mode_and_dims(mode, default_dims(dims, mode, nesting), width)
    if num_classes is None:
        if task == "classification":
            raise ValueError("num_classes is required for task='classification'")
        num_classes = config.vocab_size
    return MatryoshkaModel(lambda: BertEncoder(transformers.BertModel(config, add_pooling_layer=False),
                                               cls=task == "classification"),
                           width, num_classes, dims, mode, **head_options)
