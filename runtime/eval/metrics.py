"""Streaming semantic-segmentation metrics: one K x K confusion matrix, nothing per image.

Convention (mmsegmentation's IoUMetric): pixels whose ground truth is the ignore index are not
scored; IoU_k = TP_k / (GT_k + Pred_k - TP_k); a class with zero union (absent from both ground
truth and prediction over the whole set) has IoU NaN and is left out of the mean; pixel accuracy
(aAcc) = sum TP / scored pixels. All percentages in reports are these fractions x 100.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import ClipfuseError


class ConfusionMatrix:
    """Counts[g, p] = pixels with ground truth g predicted as p (ignore pixels excluded)."""

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 counts: Optional[np.ndarray] = None) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        if counts is None:
            counts = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (self.num_classes, self.num_classes):
            raise ClipfuseError(f"confusion matrix has shape {counts.shape}, expected "
                                f"({self.num_classes}, {self.num_classes})")
        self.counts = counts

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Add one image: `pred` and `label` are integer maps of the same shape."""
        if pred.shape != label.shape:
            raise ClipfuseError(f"prediction {pred.shape} and label {label.shape} differ in size")
        k = self.num_classes
        valid = label != self.ignore_index
        gt = label[valid].astype(np.int64, copy=False)
        pr = pred[valid].astype(np.int64, copy=False)
        if gt.size and (gt.min() < 0 or gt.max() >= k):
            raise ClipfuseError(f"label values outside 0..{k - 1} (and not {self.ignore_index}): "
                                f"{sorted(set(np.unique(gt[(gt < 0) | (gt >= k)]).tolist()))[:5]}")
        if pr.size and (pr.min() < 0 or pr.max() >= k):
            raise ClipfuseError(f"predicted class ids outside 0..{k - 1}: the model's vocabulary "
                                f"does not match the dataset's {k} classes")
        self.counts += np.bincount(gt * k + pr, minlength=k * k).reshape(k, k)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.counts += other.counts

    def to_list(self) -> List[List[int]]:
        return self.counts.tolist()

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[int]], ignore_index: int = 255) -> "ConfusionMatrix":
        counts = np.asarray(rows, dtype=np.int64)
        if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or (counts < 0).any():
            raise ValueError(f"expected a square matrix of counts >= 0, got shape {list(counts.shape)}")
        return cls(counts.shape[0], ignore_index, counts)


def iou_per_class(counts: np.ndarray) -> np.ndarray:
    """IoU of every class as a fraction; NaN where the class has zero union."""
    tp = np.diag(counts).astype(np.float64)
    union = counts.sum(0) + counts.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(counts: np.ndarray) -> float:
    """Mean over classes with non-zero union (NaN if no pixel was scored)."""
    ious = iou_per_class(counts)
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


def pixel_accuracy(counts: np.ndarray) -> float:
    total = counts.sum()
    return float(np.trace(counts) / total) if total else float("nan")


def summarize(counts: np.ndarray, class_names: Sequence[str]) -> Dict[str, object]:
    """Percentages for reports: mIoU, aAcc, per-class IoU (None for classes with zero union)."""
    ious = iou_per_class(counts)
    return {
        "mIoU": _pct(mean_iou(counts)),
        "aAcc": _pct(pixel_accuracy(counts)),
        "scored_pixels": int(counts.sum()),
        "classes_scored": int(np.isfinite(ious).sum()),
        "per_class_IoU": {name: _pct(v) for name, v in zip(class_names, ious)},
    }


def _pct(value: float) -> Optional[float]:
    return None if not np.isfinite(value) else round(100.0 * float(value), 4)
