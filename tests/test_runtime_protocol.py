"""Unit tests of clipfuse.runtime.protocol against torch / literal reimplementations of mmseg's code."""
from __future__ import annotations

import numpy as np
import pytest

from clipfuse.runtime import protocol as P
from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import Protocol

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from sclip_reference import reference_postprocess  # noqa: E402


def mmseg_windows(length: int, window: int, stride: int):
    """slide_inference's loop, verbatim, along one axis."""
    grids = max(length - window + stride - 1, 0) // stride + 1
    out = []
    for idx in range(grids):
        s = idx * stride
        e = min(s + window, length)
        out.append(max(e - window, 0))
    return out


@pytest.mark.parametrize("window,stride", [(224, 112), (448, 224), (224, 224), (224, 100), (32, 7)])
def test_window_starts_match_mmseg_loop(window, stride):
    for length in list(range(1, 3 * window + 5, 3)) + [window, window + 1, window + stride]:
        starts = P.window_starts(length, window, stride)
        assert starts == mmseg_windows(length, window, stride)
        if length >= window:  # every pixel covered, every window inside the image
            covered = np.zeros(length, bool)
            for s in starts:
                assert 0 <= s and s + window <= length
                covered[s:s + window] = True
            assert covered.all()


def test_processing_size_is_mmcv_keep_ratio():
    assert P.processing_size(375, 500, 336) == (336, 448)
    assert P.processing_size(683, 1024, 448, 2048) == (448, 672)    # 1024*448/683 = 671.65 -> int(x + .5)
    assert P.processing_size(480, 640, 448, 2048) == (448, 597)
    assert P.processing_size(100, 4000, 448, 2048) == (51, 2048)    # long side cap wins
    assert P.processing_size(5000, 5000, 448) == (448, 448)         # downscale


@pytest.mark.parametrize("src,dst", [(14, 224), (28, 448), (7, 3), (336, 683), (448, 1024), (5, 5), (1, 9)])
def test_interpolation_matrix_equals_torch_bilinear(src, dst):
    """Same rule as torch's bilinear (align_corners=False), checked in float64 to 1e-12: torch's
    float32 path computes source coordinates in float32, which alone moves results by ~1e-5."""
    rng = np.random.default_rng(src * 1000 + dst)
    x = rng.standard_normal((2, src, src + 3))
    got = (P.interpolation_matrix(src, dst, np.float64) @ x
           @ P.interpolation_matrix(src + 3, dst + 5, np.float64).T)
    want = F.interpolate(torch.from_numpy(x)[None], size=(dst, dst + 5), mode="bilinear",
                         align_corners=False)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)
    full = P.resize_scores(x, (dst, dst + 5))  # the two-tap gather path, same rule
    np.testing.assert_allclose(full, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(336, 448), (448, 672), (51, 2048), (900, 700)])
def test_resize_image_float_equals_torch_double_bilinear(size):
    rng = np.random.default_rng(sum(size))
    image = rng.integers(0, 256, (683, 1024, 3), dtype=np.uint8)
    got = P.resize_image_float(image, size)  # the refer pipeline's resize
    x = torch.from_numpy(image).permute(2, 0, 1)[None].double()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    want = torch.floor(x + 0.5 + 1e-6).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert got.shape == (*size, 3) and got.dtype == np.uint8
    assert np.array_equal(got, want)


def torch_slide_average(scores: np.ndarray, boxes, size, window):
    h, w = size
    preds = torch.zeros((1, scores.shape[1], h, w))
    count = torch.zeros((1, 1, h, w))
    for idx, (y, x) in enumerate(boxes):
        up = F.interpolate(torch.from_numpy(scores[idx:idx + 1]), size=(window, window), mode="bilinear",
                           align_corners=False)
        preds += F.pad(up, (x, w - x - window, y, h - y - window))
        count[:, :, y:y + window, x:x + window] += 1
    return (preds / count)[0].numpy()


@pytest.mark.parametrize("size,window,stride", [((336, 448), 224, 112), ((448, 671), 448, 224),
                                                ((300, 301), 224, 100)])
def test_average_window_scores_equals_mmseg_accumulation(size, window, stride):
    boxes = P.window_boxes(size[0], size[1], window, stride)
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((len(boxes), 4, window // 16, window // 16)).astype(np.float32)
    got = P.average_window_scores(scores, boxes, size, window)
    np.testing.assert_allclose(got, torch_slide_average(scores, boxes, size, window), atol=1e-5, rtol=0)


def sclip_postprocess(logits: np.ndarray, protocol: Protocol) -> np.ndarray:
    """SCLIP's postprocess_result (torch) on [K, H, W], the same reference as the parity tests."""
    return reference_postprocess(torch.from_numpy(logits), protocol).numpy()


@pytest.mark.parametrize("prob_thd,area_thd", [(0.0, None), (0.1, None), (0.1, 0.1), (0.0, 0.2), (0.5, 0.05)])
def test_postprocess_equals_sclip_in_row_blocks(monkeypatch, prob_thd, area_thd):
    rng = np.random.default_rng(1)
    # smooth maps with one small class, so area_thd removes something
    small = rng.standard_normal((5, 9, 12)).astype(np.float32) * 0.05
    small[4] -= 0.08
    size = (97, 131)
    protocol = Protocol(short_side=336, window=224, stride=112, logit_scale=40.0, prob_thd=prob_thd,
                        area_thd=area_thd)
    want = sclip_postprocess(P.resize_scores(small, size), protocol)
    monkeypatch.setattr(P, "_TARGET_BLOCK_FLOATS", 5 * 131 * 7)  # 7-row blocks: exercises chunking
    got = P.labels_from_scores(small, size, protocol)
    assert got.dtype == np.int32
    assert (got == want).mean() >= 0.9999
    assert len(np.unique(want)) >= 2


def test_probability_scores_are_argmaxed_without_thresholds():
    rng = np.random.default_rng(2)
    probs = rng.random((3, 10, 10)).astype(np.float32)
    protocol = Protocol(short_side=448, window=448, stride=224, score_type="probability", prob_thd=0.9)
    got = P.labels_from_scores(probs, (10, 10), protocol)
    assert np.array_equal(got, probs.argmax(0))


def test_image_smaller_than_window_is_padded_and_cropped():
    """An extreme aspect ratio leaves the short side below the window after the long-side cap."""
    protocol = Protocol(short_side=448, window=448, stride=224, long_side_max=2048, score_type="probability")
    seen = []

    def infer(crops):
        seen.append(crops.shape)
        # class 1 wins where a patch's top-left pixel is bright (grid = window / 16)
        bright = crops[:, ::16, ::16, 0] > 127
        return np.stack([~bright, bright], axis=1).astype(np.float32)

    image = np.zeros((50, 3000, 3), np.uint8)
    image[:, 1500:] = 255
    out = P.run_protocol(image, infer, protocol, window=448)
    assert out.processing_size == (34, 2048)
    assert all(s[1:] == (448, 448, 3) for s in seen)
    assert out.labels.shape == (50, 3000)
    assert (out.labels[:, :1400] == 0).all() and (out.labels[:, 1600:] == 1).all()


def test_run_protocol_batches_all_windows_and_chunks():
    protocol = Protocol(short_side=336, window=224, stride=112, score_type="cosine", logit_scale=40.0)
    calls = []

    def infer(crops):
        calls.append(len(crops))
        return np.zeros((len(crops), 3, 14, 14), np.float32)

    image = np.zeros((375, 500, 3), np.uint8)
    P.run_protocol(image, infer, protocol, window=224)
    assert calls == [6]                      # 2 x 3 windows, one call
    calls.clear()
    P.run_protocol(image, infer, protocol, window=224, max_batch=4)
    assert calls == [4, 2]


def test_bad_arguments_are_clear_errors():
    protocol = Protocol(short_side=336, window=224, stride=112)
    with pytest.raises(ClipfuseError, match="H x W x 3 uint8"):
        P.run_protocol(np.zeros((10, 10), np.uint8), lambda c: c, protocol, window=224)
    with pytest.raises(ClipfuseError, match="window 224 differs"):
        P.run_protocol(np.zeros((10, 10, 3), np.uint8), lambda c: c, protocol, window=448)
    with pytest.raises(ClipfuseError, match="positive"):
        P.window_starts(100, 224, 0)
