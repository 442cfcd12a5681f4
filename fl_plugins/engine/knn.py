"""Weighted k-NN monitor on backbone CLS features (DINO ``eval_knn.py`` protocol [V]; methods-spec 8.2).

Features are L2-normalised; for each query the ``k`` most cosine-similar training features vote for their
label with weight ``exp(sim / T)``; the class with the largest total vote wins. Defaults ``k = 20``,
``T = 0.07`` [V]. Top-1 accuracy is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl_plugins.data.partition import position_partition

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "knn_items", "knn_label"]


def knn_label(item: Mapping[str, Any]) -> int:
    """The k-NN monitor's label of a dataset item, read without annotation where possible.

    A slice of a volume (the item has ``slice_index``/``num_slices``) is labelled by its position partition
    (:func:`fl_plugins.data.position_partition`, 4 groups; methods-spec 7.2); any other item by
    ``int(item["label"])`` (e.g. the class of a MedMNIST image).
    """
    if "slice_index" in item:
        return position_partition(int(item["slice_index"]), int(item["num_slices"]))
    return int(item["label"])


def knn_items(
    dataset: Sequence[Mapping[str, Any]],
    max_items: int,
    seed: int,
    label_fn: Callable[[Mapping[str, Any]], int] | None = None,
) -> list[dict[str, Any]]:
    """A seeded sample of at most ``max_items`` items of ``dataset`` as ``{"image", "label"}`` k-NN items.

    The sample is ``numpy.random.default_rng(seed).permutation(len(dataset))[:max_items]``, returned in dataset
    order; each label is ``label_fn(item)`` (default :func:`knn_label`).
    """
    label_of = knn_label if label_fn is None else label_fn
    n = len(dataset)
    idx = np.random.default_rng(seed).permutation(n)[: min(n, max_items)]
    out = []
    for i in sorted(idx.tolist()):
        it = dataset[i]
        out.append({"image": it["image"], "label": label_of(it)})
    return out


@torch.no_grad()
def extract_features(
    backbone: nn.Module, items: Iterable[Mapping[str, Any]], batch_size: int = 64
) -> tuple[Tensor, Tensor]:
    """``(features [N, D] L2-normalised, labels [N] int64)`` from items ``{"image": [C, H, W], "label": int}``.

    The backbone is run in eval mode (its previous mode is restored); ``backbone(x) -> [B, D]``.
    """
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    feats: list[Tensor] = []
    labels: list[int] = []
    images: list[Tensor] = []

    def flush() -> None:
        if images:
            feats.append(F.normalize(backbone(torch.stack(images).to(device)).float(), dim=-1).cpu())
            images.clear()

    try:
        for item in items:
            if "label" not in item:
                raise ValueError("k-NN needs labelled items (an item has no 'label')")
            label = torch.as_tensor(item["label"])
            if label.numel() != 1:
                raise ValueError(f"k-NN needs one class label per image, got a label of shape {tuple(label.shape)}")
            images.append(torch.as_tensor(item["image"], dtype=torch.float32))
            labels.append(int(label))
            if len(images) == batch_size:
                flush()
        flush()
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("no items to extract features from")
    return torch.cat(feats), torch.tensor(labels, dtype=torch.int64)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> Tensor:
    """Weighted k-NN labels ``[Q]`` for L2-normalised ``query_features [Q, D]`` against ``train_features [N, D]``.

    ``k`` is capped at ``N``. Vote of neighbour ``j`` for its class: ``exp(cos_sim / temperature)``.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    n_classes = num_classes if num_classes is not None else int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    sim, idx = (query_features @ train_features.t()).topk(k, dim=1)  # [Q, k]
    weights = (sim / temperature).exp()
    votes = torch.zeros(query_features.shape[0], n_classes, dtype=weights.dtype)
    votes.scatter_add_(1, train_labels[idx], weights)
    return votes.argmax(dim=1)


def knn_accuracy(
    backbone: nn.Module,
    train_items: Iterable[Mapping[str, Any]],
    val_items: Iterable[Mapping[str, Any]],
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 64,
) -> float:
    """Top-1 weighted k-NN accuracy in ``[0, 1]`` of ``val_items`` given labelled ``train_items``.

    Args:
        backbone: ``forward(x[B, C, H, W]) -> [B, D]`` (e.g. the teacher backbone).
        train_items / val_items: iterables of ``{"image": float [C, H, W], "label": int}`` (classification items
            of docs/contracts.md).
        k: neighbours (20 [V]).
        temperature: vote temperature (0.07 [V]).
        batch_size: feature-extraction batch size.
    """
    train_f, train_y = extract_features(backbone, train_items, batch_size)
    val_f, val_y = extract_features(backbone, val_items, batch_size)
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    pred = knn_predict(train_f, train_y, val_f, k, temperature, n_classes)
    return float((pred == val_y).float().mean())
