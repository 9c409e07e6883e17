"""Referring-segmentation metrics, as the public evaluation computes them (per expression, at the
image's original resolution):
  oIoU = sum_i I_i / sum_i U_i        (overall IoU; large objects weigh more)
  mIoU = mean_i I_i / U_i             (a sample with U = 0 counts as IoU 0, like the public code)
plus the usual precision@X: the share of expressions with IoU > X.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..errors import ClipfuseError

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred: np.ndarray, target: np.ndarray) -> Tuple[int, int]:
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ClipfuseError(f"prediction {list(pred.shape)} and ground truth {list(target.shape)} differ in size")
    return int(np.logical_and(pred, target).sum()), int(np.logical_or(pred, target).sum())


@dataclass
class ReferMetrics:
    """Accumulates I and U per expression."""

    intersections: List[int] = field(default_factory=list)
    unions: List[int] = field(default_factory=list)

    def add(self, pred: np.ndarray, target: np.ndarray) -> float:
        i, u = intersection_union(pred, target)
        self.intersections.append(i)
        self.unions.append(u)
        return i / u if u else 0.0

    def __len__(self) -> int:
        return len(self.unions)

    def ious(self) -> np.ndarray:
        i = np.asarray(self.intersections, dtype=np.float64)
        u = np.asarray(self.unions, dtype=np.float64)
        return np.divide(i, u, out=np.zeros_like(i), where=u > 0)

    @property
    def oiou(self) -> float:
        total = sum(self.unions)
        return sum(self.intersections) / total if total else 0.0

    @property
    def miou(self) -> float:
        return float(self.ious().mean()) if len(self) else 0.0

    def precision_at(self, thresholds: Sequence[float] = PRECISION_THRESHOLDS) -> Dict[str, float]:
        ious = self.ious()
        return {f"P@{t:g}": float((ious > t).mean()) if len(ious) else 0.0 for t in thresholds}

    def summary(self) -> Dict[str, float]:
        out = {"expressions": len(self), "oIoU": self.oiou, "mIoU": self.miou}
        out.update(self.precision_at())
        return out
