"""sentence-transformers drop-in: MatryoshkaLoss around MultipleNegativesRankingLoss, as one fused call.

``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale), dims, weights)`` embeds the batch once and
then, per dim, truncates and re-normalises every embedding, builds a [B, B * (columns - 1)] cosine matrix and
takes its cross-entropy, keeping every dim's matrices for backward. ``MatryoshkaMultipleNegativesRankingLoss``
computes the same loss and gradients with one call of :func:`mrl_kernels.matryoshka_contrastive_loss` over
all dims. sentence-transformers is an optional extra (``pip install "mrl-kernels[st]"``), imported when the
loss is built.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..ops._validation import check_dims, check_finite
from ..ops.contrastive import matryoshka_contrastive_loss


class MatryoshkaMultipleNegativesRankingLoss(nn.Module):
    """``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale), matryoshka_dims, matryoshka_weights)``
    (``symmetric=True``: around ``MultipleNegativesSymmetricRankingLoss``, i.e. MNRL with
    ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``), fused.

    Inputs as for MNRL: an (anchor, positive) column pair, optionally followed by hard-negative columns;
    ``labels`` are ignored. Anchor i scores against every positive and every hard negative of the batch, its
    own positive being the target; the loss is the mean over anchors, summed over dims with
    ``matryoshka_weights`` (default ones), on the cosine of each truncated, re-normalised prefix times
    ``scale``. ``symmetric=True`` averages in the positive-to-anchor term (each positive against the batch's
    anchors). ``gather_across_devices=True`` scores this rank's anchors against every rank's candidates
    (and, symmetric, its positives against every rank's anchors) when torch.distributed is initialised (it is ignored otherwise, as in sentence-transformers).

    Example::

        >>> loss = MatryoshkaMultipleNegativesRankingLoss(model, [768, 512, 256, 128, 64])
        >>> SentenceTransformerTrainer(model=model, train_dataset=pairs, loss=loss).train()
    """

    def __init__(self, model: nn.Module, matryoshka_dims: Sequence[int],
                 matryoshka_weights: Sequence[float] | None = None, scale: float = 20.0,
                 gather_across_devices: bool = False, symmetric: bool = False) -> None:
        super().__init__()
        self._embed_columns = _sentence_transformers_embedder()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a SentenceTransformer (an nn.Module), got {type(model).__name__}")
        self.model = model
        self.matryoshka_dims = check_dims(matryoshka_dims, None, "matryoshka_dims")
        self.matryoshka_weights = _check_weights(matryoshka_weights, len(self.matryoshka_dims))
        self.scale = check_finite(scale, "scale", positive=True)
        self.gather_across_devices = _check_bool(gather_across_devices, "gather_across_devices")
        self.symmetric = _check_bool(symmetric, "symmetric")

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"sentence_features must hold at least 2 columns (anchor, positive, optional hard "
                             f"negatives), got {len(features)}")
        anchors, *candidates = self._embed_columns(self.model, features)
        if max(self.matryoshka_dims) > anchors.shape[1]:
            raise ValueError(f"matryoshka_dims must be at most the model's embedding dimension {anchors.shape[1]}, "
                             f"got {list(self.matryoshka_dims)}")
        # Positives first, then each hard-negative column: doc i is anchor i's positive (the op's default
        # labels), every other doc a negative of every anchor, as MNRL concatenates them.
        docs = torch.cat(candidates) if len(candidates) > 1 else candidates[0]
        return matryoshka_contrastive_loss(anchors, docs, self.matryoshka_dims, temperature=1.0 / self.scale,
                                           symmetric=self.symmetric, dim_weights=self.matryoshka_weights,
                                           gather=self.gather_across_devices and _distributed())

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "matryoshka_dims": list(self.matryoshka_dims),
            "matryoshka_weights": list(self.matryoshka_weights),
            "scale": self.scale,
            "similarity_fct": "cos_sim",
            "gather_across_devices": self.gather_across_devices,
            "symmetric": self.symmetric,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return """
@misc{kusupati2024matryoshka,
    title={Matryoshka Representation Learning},
    author={Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and Aditya Sinha and Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and Sham Kakade and Prateek Jain and Ali Farhadi},
    year={2024},
    eprint={2205.13147},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
@misc{oord2019representationlearningcontrastivepredictive,
    title={Representation Learning with Contrastive Predictive Coding},
    author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
    year={2019},
    eprint={1807.03748},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


def _sentence_transformers_embedder():
    """The function that embeds the input columns, from sentence-transformers (imported here, not at module
    import: it is an optional extra)."""
    try:
        import sentence_transformers  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "sentence_transformers":
            raise
        raise ImportError('MatryoshkaMultipleNegativesRankingLoss needs sentence-transformers: '
                          'pip install "mrl-kernels[st]"') from e
    try:
        # sentence-transformers >= 6: the anchors in one forward and the candidate columns merged into one
        # more, exactly as its MNRL embeds them.
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # older releases: one forward per column, as their MNRL does
        return lambda model, features: [model(f)["sentence_embedding"] for f in features]
    return embed_columns


def _check_weights(weights, n_dims: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * n_dims
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if not isinstance(weights, Sequence) or isinstance(weights, str) or len(weights) != n_dims:
        raise ValueError(f"matryoshka_weights must have one entry per dim in matryoshka_dims ({n_dims}), "
                         f"got {weights!r}")
    return tuple(check_finite(w, f"matryoshka_weights[{j}]") for j, w in enumerate(weights))


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _distributed() -> bool:
    """Whether there are ranks to gather from. sentence-transformers gathers over an initialised process
    group and falls back to the local batch without one, so a single-process run of a multi-GPU config works."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
