"""Segmentation metrics and the fixed held-out set shared by train.py and evaluate.py."""

from __future__ import annotations

import torch

from .data import NUM_CLASSES, make_batch

__all__ = ["HELDOUT_SEED", "HELDOUT_SIZE", "confusion", "heldout", "iou_per_class", "miou", "per_image_confusion"]

# Training batches use seeds 0, 1, 2, ... (one per step); the held-out set is far away from them.
HELDOUT_SEED = 1_000_003
HELDOUT_SIZE = 96


def heldout(n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed held-out set: (images [n, 3, 128, 128], labels [n, 128, 128])."""
    return make_batch(seed, n)


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(num_classes, num_classes) int64 confusion matrix, rows = true class, columns = predicted."""
    idx = labels.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_image_confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(N, C, C) confusion matrices, one per image (rows = true class)."""
    n = labels.shape[0]
    idx = labels.reshape(n, -1) * num_classes + pred.reshape(n, -1)
    idx = idx + (torch.arange(n)[:, None] * num_classes * num_classes)
    counts = torch.bincount(idx.reshape(-1), minlength=n * num_classes * num_classes)
    return counts.reshape(n, num_classes, num_classes)


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """IoU per class from a confusion matrix (NaN for a class absent from both labels and prediction)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def miou(pred: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> float:
    """Mean IoU over the classes present in the labels or the prediction, pooled over all pixels.

    ``pred`` and ``labels`` are integer class maps of the same shape (any shape).
    """
    if pred.shape != labels.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != labels shape {tuple(labels.shape)}")
    return float(iou_per_class(confusion(pred, labels, num_classes)).nanmean())
