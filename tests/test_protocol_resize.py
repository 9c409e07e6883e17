"""The runtime's image resize is OpenCV's INTER_LINEAR bit for bit (issue 16, item 7).

opencv-python-headless is a test-only dependency (the `dev` extra); the runtime never imports it.
"""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse.runtime import protocol as P

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (dev extra) is the reference")


def _smooth_photo(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients + discs + noise: photo-like values that exercise every rounding branch."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / max(w, 1), yy / max(h, 1), 0.5 + 0.5 * np.sin(xx / 7 + yy / 11)], -1) * 220
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


SIZES = [((375, 500), (336, 448)), ((480, 640), (336, 448)), ((1024, 2048), (560, 1120)),
         ((512, 683), (336, 448)), ((720, 1280), (448, 796)), ((100, 90), (224, 201)),
         ((37, 53), (336, 481)), ((13, 7), (5, 3)), ((300, 300), (150, 150)), ((17, 31), (17, 61)),
         ((1, 9), (4, 2)), ((9, 1), (2, 4)), ((683, 1024), (448, 672))]


@pytest.mark.parametrize("src,dst", SIZES)
def test_resize_image_is_cv2_inter_linear(src, dst):
    image = _smooth_photo(*src, seed=src[0] * 7 + dst[1])
    want = cv2.resize(image, (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
    got = P.resize_image(image, dst)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want), f"{int((got != want).sum())} values differ"


def test_resize_image_is_cv2_on_random_sizes_up_and_down():
    rng = np.random.default_rng(16)
    for _ in range(120):
        h, w = (int(v) for v in rng.integers(1, 260, 2))
        oh, ow = (int(v) for v in rng.integers(1, 360, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = cv2.resize(image, (ow, oh), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(P.resize_image(image, (oh, ow)), want), (h, w, oh, ow)


def test_textbook_rounding_would_fail():
    """The test can fail: the exact-integer (sum + 2^21) >> 22 rule differs from cv2 on ~12 % of values."""
    image = _smooth_photo(375, 500, 0)
    x0, x1, a0, a1 = P.cv_linear_coefficients(500, 448)
    y0, y1, b0, b1 = P.cv_row_coefficients(375, 336)
    src = image.astype(np.int64)
    horiz = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]
    textbook = (horiz[y0] * b0[:, None, None] + horiz[y1] * b1[:, None, None] + (1 << 21)) >> 22
    want = cv2.resize(image, (448, 336), interpolation=cv2.INTER_LINEAR)
    assert (textbook != want).mean() > 0.05
