"""Streaming confusion-matrix metrics against values worked out by hand."""
import math

import numpy as np
import pytest

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.eval.metrics import (ConfusionMatrix, iou_per_class, mean_iou, pixel_accuracy,
                                           summarize)

# 7 scored pixels, one ignored (its prediction 0 must not count anywhere).
LABEL = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])
# rows = ground truth, columns = prediction, written out from the pixels above
EXPECTED = np.array([[1, 1, 0],
                     [0, 2, 1],
                     [1, 0, 1]])


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(3)
    cm.update(PRED, LABEL)
    np.testing.assert_array_equal(cm.counts, EXPECTED)
    # IoU_k = TP / (GT + Pred - TP): class0 1/(2+2-1), class1 2/(3+3-2), class2 1/(2+2-1)
    np.testing.assert_allclose(iou_per_class(cm.counts), [1 / 3, 1 / 2, 1 / 3], rtol=0, atol=1e-12)
    assert mean_iou(cm.counts) == pytest.approx(7 / 18, abs=1e-12)
    assert pixel_accuracy(cm.counts) == pytest.approx(4 / 7, abs=1e-12)


def test_streaming_equals_one_shot_and_keeps_no_images():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 5, size=(7, 9)) for _ in range(4)]
    preds = [rng.integers(0, 5, size=(7, 9)) for _ in range(4)]
    for lab in labels:
        lab[lab == 4] = 255  # class 4 only ever predicted, never in GT
    cm = ConfusionMatrix(5)
    for p, l in zip(preds, labels):
        cm.update(p, l)
    flat_l, flat_p = np.concatenate([l.ravel() for l in labels]), np.concatenate([p.ravel() for p in preds])
    keep = flat_l != 255
    ref = np.zeros((5, 5), np.int64)
    np.add.at(ref, (flat_l[keep], flat_p[keep]), 1)
    np.testing.assert_array_equal(cm.counts, ref)
    assert set(vars(cm)) == {"num_classes", "ignore_index", "counts"}


def test_absent_class_is_nan_and_excluded_false_positive_class_counts_zero():
    cm = ConfusionMatrix(4)  # class 3 never appears anywhere
    cm.update(PRED, LABEL)
    ious = iou_per_class(cm.counts)
    assert math.isnan(ious[3])
    assert mean_iou(cm.counts) == pytest.approx(7 / 18, abs=1e-12)
    # one extra GT-0 pixel predicted as 3: class 3 now has union 1, IoU 0, and enters the mean;
    # class 0 gains one GT pixel: IoU0 = 1 / (3 + 2 - 1) = 1/4
    cm.update(np.array([[3]]), np.array([[0]]))
    ious = iou_per_class(cm.counts)
    np.testing.assert_allclose(ious, [1 / 4, 1 / 2, 1 / 3, 0.0], atol=1e-12)
    assert mean_iou(cm.counts) == pytest.approx((1 / 4 + 1 / 2 + 1 / 3 + 0) / 4, abs=1e-12)
    summary = summarize(cm.counts, ["a", "b", "c", "d"])
    assert summary["mIoU"] == pytest.approx(100 * (1 / 4 + 1 / 2 + 1 / 3) / 4, abs=1e-3)
    assert summary["aAcc"] == pytest.approx(100 * 4 / 8, abs=1e-3)
    assert summary["per_class_IoU"]["d"] == 0.0


def test_all_ignored_gives_nan_and_bad_ids_raise():
    cm = ConfusionMatrix(3)
    cm.update(np.zeros((2, 2), int), np.full((2, 2), 255))
    assert cm.counts.sum() == 0 and math.isnan(mean_iou(cm.counts))
    assert summarize(cm.counts, "abc")["mIoU"] is None
    with pytest.raises(ClipfuseError, match="predicted class ids outside 0..2"):
        cm.update(np.array([[3]]), np.array([[0]]))
    with pytest.raises(ClipfuseError, match="label values outside"):
        cm.update(np.array([[0]]), np.array([[7]]))
    with pytest.raises(ClipfuseError, match="differ in size"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))


def test_round_trip_through_lists():
    cm = ConfusionMatrix(3)
    cm.update(PRED, LABEL)
    again = ConfusionMatrix.from_list(cm.to_list())
    np.testing.assert_array_equal(again.counts, EXPECTED)
