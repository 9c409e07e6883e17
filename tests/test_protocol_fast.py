"""The fast host path (composed separable matrices, logits argmax, softmax only where a threshold
needs it) gives the labels of the step-by-step reference path: per-window upsampling, overlap
average, resize, softmax, area_thd, prob_thd (average_window_scores + labels_from_scores)."""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse.runtime import protocol as P
from clipfuse.runtime.methods import Protocol


def _smooth_scores(rng, b: int, k: int, g: int, probability: bool, amplitude: float = 0.2) -> np.ndarray:
    base = rng.standard_normal((b, k, 3, 3))
    up = P.interpolation_matrix(3, g, np.float64)
    s = amplitude * np.einsum("ij,bkjl,ml->bkim", up, base, up) + 0.02 * rng.standard_normal((b, k, g, g))
    if probability:
        e = np.exp(20 * s)
        s = e / e.sum(1, keepdims=True)
    return s.astype(np.float32)


CASES = [
    ((375, 500), 21, Protocol(336, 224, 112, 2048, "cosine", 65.0, 0.1, 0.1)),   # SCLIP VOC rules
    ((200, 333), 40, Protocol(336, 224, 112, 2048, "cosine", 40.0, 0.0, None)),
    ((256, 512), 7, Protocol(224, 224, 112, 2048, "cosine", 50.0, 0.3, 0.3)),    # area rule removes classes
    ((375, 500), 6, Protocol(448, 448, 224, 2048, "probability", 1.0)),
    ((100, 90), 5, Protocol(336, 224, 112, 2048, "cosine", 50.0, 0.3, 0.2)),
    ((30, 40), 5, Protocol(100, 224, 112, 2048, "cosine", 50.0, 0.3, 0.2)),      # smaller than a window
]


@pytest.mark.parametrize("size,classes,protocol", CASES)
def test_fast_path_labels_equal_reference_path(size, classes, protocol):
    rng = np.random.default_rng(classes)
    proc = P.processing_size(*size, protocol.short_side, protocol.long_side_max)
    boxes = P.window_boxes(*proc, protocol.window, protocol.stride)
    scores = _smooth_scores(rng, len(boxes), classes, protocol.window // 16, protocol.score_type == "probability")
    avg = P.average_window_scores(scores, boxes, proc, protocol.window)
    want = P.labels_from_scores(avg, size, protocol)
    got, conf = P.labels_from_window_scores(scores, proc, size, protocol, protocol.window, True)
    assert got.shape == size and got.dtype == np.int32
    assert (got != want).mean() <= 1e-4, int((got != want).sum())  # float32 order: near-ties only
    labels_only, none = P.labels_from_window_scores(scores, proc, size, protocol, protocol.window)
    assert none is None and (labels_only != want).mean() <= 1e-4
    np.testing.assert_allclose(P.window_scores_average(scores, proc, protocol.window, protocol.stride),
                               avg, atol=1e-5)
    probs = P.class_scores(P.resize_scores(avg, size), protocol)   # confidence = prob of the chosen class
    chosen = np.take_along_axis(probs, want[None].astype(np.int64), 0)[0]
    same = got == want
    if protocol.score_type == "cosine" and protocol.prob_thd:
        same &= want != 0   # below-threshold pixels report the (low) top kept probability instead
    np.testing.assert_allclose(conf[same], chosen[same], atol=1e-5)


def test_pruned_tiles_keep_labels_and_skip_work(monkeypatch):
    """Well-separated classes (as with real CLIP): most tiles have one candidate and, with
    prob_thd, a provable top probability; labels still equal the reference path's."""
    rng = np.random.default_rng(3)
    protocol = Protocol(336, 224, 112, 2048, "cosine", 65.0, 0.1, 0.1)
    size = (480, 640)
    proc = P.processing_size(*size, protocol.short_side, protocol.long_side_max)
    boxes = P.window_boxes(*proc, protocol.window, protocol.stride)
    # a piecewise-constant scene, like a real segmentation: 4 regions, 0.3 cosine margin + noise
    scores = 0.02 * rng.standard_normal((len(boxes), 21, 14, 14))
    for i, (y, x) in enumerate(boxes):
        cy = y + (np.arange(14) + 0.5) * 16
        cx = x + (np.arange(14) + 0.5) * 16
        region = 1 + (cy[:, None] > proc[0] / 2) * 2 + (cx[None, :] > proc[1] / 2)
        np.put_along_axis(scores[i], region[None], 0.3, axis=0)
    scores = scores.astype(np.float32)
    want = P.labels_from_scores(P.average_window_scores(scores, boxes, proc, protocol.window), size, protocol)
    calls = []
    real = P._tile_logits
    monkeypatch.setattr(P, "_tile_logits", lambda *a: calls.append(1) or real(*a))
    got, _ = P.labels_from_window_scores(scores, proc, size, protocol, protocol.window)
    assert (got != want).mean() <= 1e-4 and len(np.unique(want)) >= 3
    tiles = -(-size[0] // P._TILE[0]) * -(-size[1] // P._TILE[1])
    assert len(calls) < 2 * tiles     # two passes (area rule); pruning skipped some tiles
