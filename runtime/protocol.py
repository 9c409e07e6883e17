"""The sliding-window inference protocol of the dense-CLIP methods, in numpy
(docs/methods.md#the-sliding-window-protocol).

image -> short-side resize (long side capped) -> window grid -> ALL windows in one batched backend
call (chunked to the backend's max batch) -> per-window bilinear upsampling to the window ->
sum + count -> average -> bilinear resize to the original size -> post-processing by score type:
  cosine:      x logit_scale, softmax over classes, area_thd, prob_thd, argmax   (SCLIP's rule)
  probability: argmax (CLIP-DINOiser: the graph already applied softmax and its background rule)

Every resize is bilinear with align_corners=False and no antialiasing, which is what the methods'
code does. The uint8 image resize is OpenCV's INTER_LINEAR bit for bit (`resize_image`, its
fixed-point rule emulated), as mmcv resizes with cv2. Score maps follow torch F.interpolate; that
rule is written once as two taps per output index (`linear_taps`, `interpolation_matrix`).

The runtime path (`labels_from_window_scores`) composes upsampling, averaging and the final resize
into two banded matrices and computes, per output tile, only the classes that can win there; the
step-by-step functions (`average_window_scores`, `resize_scores`, `labels_from_scores`) are the
reference it is tested against (tests/test_protocol_fast.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from .errors import ClipfuseError
from .limits import GEOMETRY_BYTES, GEOMETRY_CACHE_BYTES
from .manifest import ImageManifest, parse_manifest  # noqa: F401 (ImageManifest: annotations)
from .methods import Protocol

# Rows of the full-size score map processed at once: bounds memory to K x ROWS x W floats.
_TARGET_BLOCK_FLOATS = 1 << 24  # 64 MB of float32
# Float64 noise of the two-tap sums is ~1e-13; anything within this of x.5 is a tie.
_TIE_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Bilinear resize (align_corners=False, no antialias) as two taps per output index
# ---------------------------------------------------------------------------------------------
def linear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Indices i0, i1 and weights w0, w1 with out[j] = w0[j] * in[i0[j]] + w1[j] * in[i1[j]].

    Same rule as torch's upsample_bilinear2d / cv2 INTER_LINEAR: src = (j + 0.5) * in/out - 0.5,
    clamped at 0; the right neighbour is clamped at the last index.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    w1[i0 == in_size - 1] = 0.0  # beyond the last source pixel: copy it
    w0 = 1.0 - w1
    return i0, i1, w0, w1


def interpolation_matrix(in_size: int, out_size: int, dtype=np.float32) -> np.ndarray:
    """[out_size, in_size] matrix M with out = M @ in (bilinear, align_corners=False)."""
    i0, i1, w0, w1 = linear_taps(in_size, out_size)
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(mat, (rows, i0), w0)
    np.add.at(mat, (rows, i1), w1)
    return mat.astype(dtype)


def _lerp(a: np.ndarray, b: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """w0 * a + w1 * b with w0 = 1 - w1, as a + w1 * (b - a) in place (two passes fewer)."""
    b -= a
    b *= w1
    a += b
    return a


def _resize_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    i0, i1, _, w1 = linear_taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    return _lerp(np.take(x, i0, axis=axis), np.take(x, i1, axis=axis), w1.astype(x.dtype).reshape(shape))


def resize_image_float(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8 -> size (h, w) uint8, bilinear in float64, rounded half up (torch-style
    resize of the refer pipeline; the segmentation protocol uses `resize_image`, OpenCV's rule).

    Exact ties (x.5) are common (e.g. 1024 -> 672 has dyadic weights) and float order decides
    them at random, so ties round up explicitly.
    """
    if tuple(image.shape[:2]) == tuple(size):
        return image
    x = _resize_axis(image.astype(np.float64), 1, size[1])
    x = _resize_axis(x, 0, size[0])
    return np.clip(np.floor(x + (0.5 + _TIE_EPS)), 0, 255).astype(np.uint8)


# OpenCV's INTER_LINEAR for 8-bit images works in fixed point: 11-bit coefficients.
CV_COEF_BITS = 11
CV_COEF_SCALE = 1 << CV_COEF_BITS


def cv_linear_coefficients(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, c0, c1): out[j] = c0[j] * in[i0[j]] + c1[j] * in[i1[j]] with 11-bit integer weights.

    OpenCV's rule, step by step: the source coordinate is computed in double and stored as float,
    floored, its fraction taken in float, clamped at both borders (fraction 0), and each weight
    rounded half-to-even to a multiple of 1/2048 (saturate_cast<short>(w * 2048)).
    """
    scale = 1.0 / (out_size / in_size)
    f = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    frac = (f - i0.astype(np.float32)).astype(np.float32)
    low, high = i0 < 0, i0 >= in_size - 1
    frac[low | high] = 0.0
    i0[low] = 0
    i0[high] = in_size - 1
    c0 = np.rint((np.float32(1.0) - frac) * np.float32(CV_COEF_SCALE)).astype(np.int32)
    c1 = np.rint(frac * np.float32(CV_COEF_SCALE)).astype(np.int32)
    return i0, np.minimum(i0 + 1, in_size - 1), c0, c1


def cv_row_coefficients(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vertical coefficients: OpenCV does not clamp the row fraction, it clamps the row indices
    (a row above the image reads row 0 with both weights)."""
    scale = 1.0 / (out_size / in_size)
    f = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    sy = np.floor(f).astype(np.int64)
    frac = (f - sy.astype(np.float32)).astype(np.float32)
    c0 = np.rint((np.float32(1.0) - frac) * np.float32(CV_COEF_SCALE)).astype(np.int32)
    c1 = np.rint(frac * np.float32(CV_COEF_SCALE)).astype(np.int32)
    return np.clip(sy, 0, in_size - 1), np.clip(sy + 1, 0, in_size - 1), c0, c1


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """H x W x C uint8 -> size (h, w) uint8, bit-identical to cv2.resize(..., INTER_LINEAR).

    The methods resize the image with mmcv, i.e. OpenCV. Its 8-bit path: a horizontal pass in
    exact integers (pixel x 11-bit weight, sums < 2^20), then a vertical pass that OpenCV's SIMD
    kernel computes as ((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16), rounded by (+2) >> 2; that
    truncation, not the textbook (sum + 2^21) >> 22, is what cv2 returns (verified against
    opencv-python-headless 5.0 on hundreds of sizes, tests/test_protocol_resize.py).
    """
    if tuple(image.shape[:2]) == tuple(size):
        return image
    out_h, out_w = int(size[0]), int(size[1])
    x0, x1, a0, a1 = cv_linear_coefficients(image.shape[1], out_w)
    y0, y1, b0, b1 = cv_row_coefficients(image.shape[0], out_h)
    rows, inverse = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    src = image[rows]                              # only the source rows the output reads (uint8)
    shape = (1, out_w) + (1,) * (image.ndim - 2)
    horiz = src[:, x0].astype(np.int32)            # gather as uint8, widen once, then in place
    horiz *= a0.reshape(shape)
    right = src[:, x1].astype(np.int32)
    right *= a1.reshape(shape)
    horiz += right
    horiz >>= 4
    bshape = (out_h,) + (1,) * (image.ndim - 1)
    top = horiz[inverse[:out_h]]
    top *= b0.reshape(bshape)
    top >>= 16
    bottom = horiz[inverse[out_h:]]
    bottom *= b1.reshape(bshape)
    bottom >>= 16
    top += bottom
    top += 2
    top >>= 2
    return np.clip(top, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Geometry: processing size and window grid
# ---------------------------------------------------------------------------------------------
def processing_size(height: int, width: int, short_side: int,
                    long_side_max: Optional[int] = None) -> Tuple[int, int]:
    """mmcv's keep-ratio rescale: scale = min(short/short_edge, long_max/long_edge), round half up."""
    scale = short_side / min(height, width)
    if long_side_max:
        scale = min(scale, long_side_max / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """Starts of the windows along one axis (docs/methods.md#the-sliding-window-protocol, step 2;
    mmseg slide_inference).

    n = max(L - win + stride - 1, 0) // stride + 1; the last window is shifted back inside the
    image. When L < window there is one window at 0 (the image is padded, see `extract_windows`).
    """
    if window <= 0 or stride <= 0:
        raise ClipfuseError(f"window ({window}) and stride ({stride}) must be positive")
    count = max(length - window + stride - 1, 0) // stride + 1
    starts = []
    for i in range(count):
        end = min(i * stride + window, length)
        starts.append(max(end - window, 0))
    return starts


def window_boxes(height: int, width: int, window: int, stride: int) -> List[Tuple[int, int]]:
    """(y0, x0) of every window, row-major (the order of mmseg's loops)."""
    return [(y, x) for y in window_starts(height, window, stride)
            for x in window_starts(width, window, stride)]


def extract_windows(image: np.ndarray, boxes: Sequence[Tuple[int, int]], window: int) -> np.ndarray:
    """[B, window, window, 3] uint8 crops. An image smaller than the window on an axis is padded
    with black on the bottom/right; only the valid part of the scores is used afterwards."""
    h, w = image.shape[:2]
    if h < window or w < window:
        padded = np.zeros((max(h, window), max(w, window), 3), dtype=np.uint8)
        padded[:h, :w] = image
        image = padded
    return np.stack([image[y:y + window, x:x + window] for y, x in boxes])


# ---------------------------------------------------------------------------------------------
# Window scores -> averaged score map
# ---------------------------------------------------------------------------------------------
def average_window_scores(scores: np.ndarray, boxes: Sequence[Tuple[int, int]],
                          size: Tuple[int, int], window: int) -> np.ndarray:
    """[B, K, g, g] window scores -> [K, h, w] average over the windows covering each pixel.

    Each window's scores are upsampled bilinearly to window x window first (as every method does
    per crop), then summed where the windows overlap and divided by the overlap count.
    """
    h, w = size
    gy, gx = scores.shape[2:]
    up_y = interpolation_matrix(gy, window)
    up_x = interpolation_matrix(gx, window)
    full_h, full_w = max(h, window), max(w, window)
    total = np.zeros((scores.shape[1], full_h, full_w), dtype=np.float32)
    count = np.zeros((full_h, full_w), dtype=np.float32)
    for idx, (y, x) in enumerate(boxes):
        up = up_y @ scores[idx].astype(np.float32) @ up_x.T  # [K, window, window]
        total[:, y:y + window, x:x + window] += up
        count[y:y + window, x:x + window] += 1.0
    return (total[:, :h, :w] / count[:h, :w]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Post-processing at the original size, in row blocks (bounded memory)
# ---------------------------------------------------------------------------------------------
def _row_blocks(height: int, width: int, classes: int) -> Iterator[Tuple[int, int]]:
    rows = max(1, _TARGET_BLOCK_FLOATS // max(1, classes * width))
    for r0 in range(0, height, rows):
        yield r0, min(height, r0 + rows)


def _resized_rows(avg: np.ndarray, size: Tuple[int, int], r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of `avg` [K, h, w] resized bilinearly to `size` (H, W): [K, r1-r0, W].

    Width first, on only the source rows these output rows read (fewer rows than the output when
    upsampling), then rows blended by whole-row gathers, which are contiguous and fast.
    """
    i0, i1, _, w1 = linear_taps(avg.shape[1], size[0])
    sl = slice(r0, r1)
    lo, hi = int(i0[sl].min()), int(i1[sl].max()) + 1
    src = _resize_axis(avg[:, lo:hi, :], 2, size[1])
    return _lerp(np.take(src, i0[sl] - lo, axis=1), np.take(src, i1[sl] - lo, axis=1),
                 w1[sl].astype(avg.dtype)[None, :, None])


def _argmax0(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(argmax, max) over axis 0 of [K, ...] as K contiguous passes (np.argmax(axis=0) is strided
    and several times slower); ties keep the first class, like np.argmax."""
    best = x[0].copy()
    index = np.zeros(best.shape, dtype=np.int32)
    for k in range(1, x.shape[0]):
        better = x[k] > best
        index[better] = k
        np.maximum(best, x[k], out=best)
    return index, best


def resize_scores(avg: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """[K, h, w] -> [K, H, W] bilinear (the full map at once; for tests and small images)."""
    return _resized_rows(avg, size, 0, size[0])


def _softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def class_scores(block: np.ndarray, protocol: Protocol) -> np.ndarray:
    """Averaged, resized scores -> per-class probabilities (cosine) or the scores as they are."""
    if protocol.score_type == "cosine":
        return _softmax(block * np.float32(protocol.logit_scale), axis=0)
    if protocol.score_type == "probability":
        return block
    raise ClipfuseError(f"unknown score_type {protocol.score_type!r} in the manifest protocol")


def labels_from_scores(avg: np.ndarray, size: Tuple[int, int], protocol: Protocol) -> np.ndarray:
    """Averaged scores [K, h, w] -> label map [H, W] int32 at the original size.

    Cosine heads follow SCLIP's post-processing: probabilities = softmax(logit_scale x cosine);
    area_thd zeroes every non-background class whose argmax area is <= area_thd x (all
    non-background argmax pixels); pixels whose remaining max probability < prob_thd become class 0.
    """
    return labels_and_confidence(avg, size, protocol)[0]


def labels_and_confidence(avg: np.ndarray, size: Tuple[int, int],
                          protocol: Protocol) -> Tuple[np.ndarray, np.ndarray]:
    """`labels_from_scores` plus the confidence map [H, W] float32: the winning class's score
    after the area rule (probability for cosine heads, the graph's score for probability heads),
    i.e. the value prob_thd is compared with; pixels moved to class 0 keep that value."""
    height, width = size
    num_classes = avg.shape[0]
    labels = np.empty((height, width), dtype=np.int32)
    confidence = np.empty((height, width), dtype=np.float32)
    cosine = protocol.score_type == "cosine"
    keep = None
    if cosine and protocol.area_thd is not None and num_classes > 1:
        area = np.zeros(num_classes, dtype=np.int64)
        for r0, r1 in _row_blocks(height, width, num_classes):
            probs = class_scores(_resized_rows(avg, size, r0, r1), protocol)
            area += np.bincount(_argmax0(probs)[0].ravel(), minlength=num_classes)
        foreground = area[1:]
        keep = np.ones(num_classes, dtype=np.float32)
        keep[1:] = (foreground > protocol.area_thd * foreground.sum()).astype(np.float32)
    for r0, r1 in _row_blocks(height, width, num_classes):
        probs = class_scores(_resized_rows(avg, size, r0, r1), protocol)
        if keep is not None:
            probs *= keep[:, None, None]
        block, top = _argmax0(probs)
        if cosine and protocol.prob_thd:
            block[top < protocol.prob_thd] = 0
        labels[r0:r1] = block
        confidence[r0:r1] = top
    return labels, confidence


# ---------------------------------------------------------------------------------------------
# The fast host path: window scores -> labels without materialising the intermediate maps
# ---------------------------------------------------------------------------------------------
# Every step between the window scores and the full-size score map is linear and separable:
# per-window upsampling (g -> window), placing the window, dividing by the overlap count (which
# is a product of a row count and a column count, the windows forming a grid) and the final
# resize to the image. So full[k] = R @ S_k @ C^T, where S_k tiles all window scores of class k
# on one coarse grid [ny*gy, nx*gx] and R [H, ny*gy], C [W, nx*gx] are the composed matrices
# (precomputed in float64 once per geometry). R and C are banded: a tile of the output reads a
# small rectangle of the coarse grid, and since each output value is a convex combination of that
# rectangle's values, only classes whose coarse maximum reaches the best coarse minimum can win
# there; most tiles have one such class and cost nothing (see _tile_pass). Softmax is monotonic:
# labels come from the logits, exponentials are paid only where prob_thd or the confidence needs
# the top probability, and only for the classes that can matter.


def _axis_matrix(starts: Tuple[int, ...], proc: int, window: int, grid: int,
                 out: Optional[int]) -> np.ndarray:
    """[out or proc, len(starts) * grid] float64: coarse window scores along one axis -> averaged
    (and, with `out`, resized) values along that axis."""
    up = interpolation_matrix(grid, window, np.float64)
    full = max(proc, window)
    place = np.zeros((full, len(starts) * grid))
    count = np.zeros(full)
    for i, s in enumerate(starts):
        place[s:s + window, i * grid:(i + 1) * grid] += up
        count[s:s + window] += 1.0
    avg = place[:proc] / count[:proc, None]
    if out is None:
        return avg
    # The resize has two taps per output index: gather them instead of multiplying by a dense
    # [out, proc] matrix (a 1 x 400000 strip made that 6 GB of float64 zeros).
    i0, i1, w0, w1 = linear_taps(proc, out)
    resized = avg[i0]
    resized *= w0[:, None]
    resized += avg[i1] * w1[:, None]
    return resized


class _BytesLRU:
    """A thread-safe LRU cache bounded by the bytes of its values (the server sees many image
    sizes, and one geometry of a long image is MBs: an entry count bounds nothing)."""

    def __init__(self, limit: int) -> None:
        import threading
        from collections import OrderedDict

        self.limit, self.bytes = limit, 0
        self._items: "OrderedDict[tuple, Tuple[object, int]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: tuple, value: object, nbytes: int) -> None:
        with self._lock:
            if key in self._items or nbytes > self.limit:
                return
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.limit:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


_GEOMETRIES = _BytesLRU(GEOMETRY_CACHE_BYTES.value)


def geometry_cache_clear() -> None:
    _GEOMETRIES.clear()


def geometry_cache_bytes() -> int:
    return _GEOMETRIES.bytes


def window_geometry(out_h: int, out_w: int, proc_h: int, proc_w: int, window: int, stride: int,
                    gy: int, gx: int, to_output: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows [H, ny*gy], cols [W, nx*gx], row_band [H, 2]) float32 composed matrices: window scores
    [ny*gy, nx*gx] -> averaged, resized scores [H, W] is rows @ S @ cols.T (public: the frame graph
    bakes the same matrices, export/frame_graph.py). Cached, bounded in bytes (_geometry_tables)."""
    return _geometry_tables(out_h, out_w, proc_h, proc_w, window, stride, gy, gx, to_output)[:3]


def _geometry_tables(out_h: int, out_w: int, proc_h: int, proc_w: int, window: int, stride: int,
                     gy: int, gx: int, to_output: bool = True
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows [H, ny*gy], cols [W, nx*gx], row_band [H, 2], col_band [W, 2]) composed matrices
    (float32; bands int). Their size is checked against GEOMETRY_BYTES before they are built."""
    key = (out_h, out_w, proc_h, proc_w, window, stride, gy, gx, to_output)
    hit = _GEOMETRIES.get(key)
    if hit is not None:
        return hit
    ys = tuple(window_starts(proc_h, window, stride))
    xs = tuple(window_starts(proc_w, window, stride))
    n_rows, n_cols = (out_h, out_w) if to_output else (proc_h, proc_w)
    # float64 while composing, float32 kept: 12 bytes per table entry at the peak
    need = (n_rows * len(ys) * gy + n_cols * len(xs) * gx) * 12
    GEOMETRY_BYTES.check(need, f"image {out_h} x {out_w} (too elongated for the window protocol; crop it)")
    rows = _axis_matrix(ys, proc_h, window, gy, out_h if to_output else None)
    cols = _axis_matrix(xs, proc_w, window, gx, out_w if to_output else None)
    cols32 = cols.astype(np.float32)
    del cols
    value = (rows.astype(np.float32), cols32, _bands(rows), _bands(cols32))
    del rows
    for table in value:     # shared through the cache: a caller writing into one would corrupt later calls
        table.setflags(write=False)
    _GEOMETRIES.put(key, value, sum(int(v.nbytes) for v in value))
    return value


def _coarse_columns(scores: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """[ny*nx, K, gy, gx] (row-major windows) -> [nx*gx, ny*gy*K]: coarse column j, then (row i, class)."""
    b, k, gy, gx = scores.shape
    return np.ascontiguousarray(scores.reshape(ny, nx, k, gy, gx).transpose(1, 4, 0, 3, 2)
                                ).reshape(nx * gx, ny * gy * k)


def _row_major(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Columns applied: [ny*gy, W*K] (coarse row, then output column, then class)."""
    k = scores.shape[1]
    t = cols @ _coarse_columns(scores.astype(np.float32, copy=False), ny, nx)   # [W, ny*gy*K]
    width = cols.shape[0]
    return np.ascontiguousarray(t.reshape(width, rows.shape[1], k).transpose(1, 0, 2)).reshape(rows.shape[1], -1)


# Tiles of the output: each reads a small rectangle of the coarse grid (rows/cols are banded).
_TILE = (64, 128)
# Softmax terms below exp(-_NEGLIGIBLE) x the top one cannot move a float32 sum of >= 1.
_NEGLIGIBLE = 30.0


def _bands(m: np.ndarray) -> np.ndarray:
    nz = m != 0
    return np.stack([nz.argmax(1), nz.shape[1] - nz[:, ::-1].argmax(1)], axis=1)


def _coarse_grid(scores: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """[ny*nx, K, gy, gx] (row-major windows) -> [ny*gy, nx*gx, K] coarse score grid."""
    b, k, gy, gx = scores.shape
    return np.ascontiguousarray(scores.reshape(ny, nx, k, gy, gx).transpose(0, 3, 1, 4, 2)
                                ).reshape(ny * gy, nx * gx, k)


def _tile_pass(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray, rband: np.ndarray,
               cband: np.ndarray, allowed: np.ndarray, scale: Optional[float],
               labels: np.ndarray, top: Optional[np.ndarray], only_below: float = 0.0) -> None:
    """Argmax over the `allowed` classes of the full-size logits rows @ grid @ cols^T, per tile,
    computing only the classes that can win there; with `scale`, also the softmax probability of
    the chosen class (over all classes) into `top`.

    Every full-size value is a convex combination of the coarse values of its tile's rectangle
    (bilinear and averaging weights are >= 0 and sum to 1), so a class whose maximum there is below
    the best class minimum cannot be the argmax anywhere in the tile: most tiles have one candidate
    and need no arithmetic at all. Classes more than _NEGLIGIBLE / scale below it cannot change a
    float32 softmax denominator. `only_below`: `top` is needed only to compare it with this
    threshold; a tile whose one candidate provably keeps a probability above it everywhere (bound
    from the coarse maxima of the other classes) is then not computed (its `top` is set to 1).
    """
    height, width = labels.shape
    th, tw = _TILE
    for r0 in range(0, height, th):
        r1 = min(height, r0 + th)
        rl, rh = int(rband[r0:r1, 0].min()), int(rband[r0:r1, 1].max())
        a = rows[r0:r1, rl:rh]
        for c0 in range(0, width, tw):
            c1 = min(width, c0 + tw)
            cl, ch = int(cband[c0:c1, 0].min()), int(cband[c0:c1, 1].max())
            sub = grid[rl:rh, cl:ch]
            hi = sub.max(axis=(0, 1))
            lo = sub.min(axis=(0, 1))
            bound = lo[allowed].max()
            eps = 1e-5 * max(1.0, abs(float(bound)))
            compute = allowed & (hi >= bound - eps)
            if scale is not None and only_below and np.count_nonzero(compute) == 1:
                c = int(np.argmax(compute))
                rest = np.exp(np.float64(scale) * (np.delete(hi, c).astype(np.float64) - float(lo[c]) + eps))
                if 1.0 / (1.0 + rest.sum()) >= only_below * (1 + 1e-4):
                    labels[r0:r1, c0:c1] = c
                    top[r0:r1, c0:c1] = 1.0
                    continue
            if scale is not None:
                compute |= hi >= lo.max() - _NEGLIGIBLE / scale - eps
            idx = np.flatnonzero(compute)
            if idx.size == 1:
                labels[r0:r1, c0:c1] = idx[0]
                if top is not None and scale is not None:
                    top[r0:r1, c0:c1] = 1.0       # every other class is negligible here
                elif top is not None:
                    top[r0:r1, c0:c1] = _tile_logits(a, sub[:, :, idx], cols[c0:c1, cl:ch])[..., 0]
                continue
            logits = _tile_logits(a, sub[:, :, idx], cols[c0:c1, cl:ch])        # [R, C, n]
            masked = logits if allowed[idx].all() else np.where(allowed[idx], logits, -np.inf)
            pick = np.argmax(masked, axis=-1)
            labels[r0:r1, c0:c1] = idx[pick]
            if top is None:
                continue
            chosen = np.take_along_axis(logits, pick[..., None], axis=-1)[..., 0]
            chosen_z = True
            if scale is None:
                top[r0:r1, c0:c1] = chosen
                continue
            if masked is logits:   # the chosen class is the overall maximum: its term is 1
                z = logits - chosen[..., None]
                chosen_z = None
            else:
                z = logits - logits.max(axis=-1, keepdims=True)
            z *= np.float32(scale)
            np.exp(z, out=z)
            # the sum over a short last axis as a BLAS gemv (numpy's reduction is slow per row)
            denom = (z.reshape(-1, z.shape[-1]) @ np.ones(z.shape[-1], np.float32)).reshape(z.shape[:-1])
            if chosen_z is None:
                top[r0:r1, c0:c1] = 1.0 / denom
            else:
                top[r0:r1, c0:c1] = np.take_along_axis(z, pick[..., None], axis=-1)[..., 0] / denom


def _tile_logits(a: np.ndarray, sub: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a [R, nr] @ sub [nr, nc, n] @ c [C, nc]^T -> [R, C, n] float32."""
    nr, nc, n = sub.shape
    c, a = np.ascontiguousarray(c), np.ascontiguousarray(a)   # strided operands miss BLAS
    x = np.matmul(c, sub)                 # [nr, C, n]: small batched products on the coarse rows
    return (a @ x.reshape(nr, -1)).reshape(a.shape[0], c.shape[0], n)   # one BLAS-shaped gemm


def labels_from_window_scores(scores: np.ndarray, proc_size: Tuple[int, int], size: Tuple[int, int],
                              protocol: Protocol, window: int, want_confidence: bool = False,
                              timings: Optional[dict] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """[B, K, gy, gx] window scores (windows of `window_boxes(proc_size, ...)`, row-major) ->
    (labels [H, W] int32, confidence [H, W] float32 or None) at the image size `size`.

    Same result as average_window_scores -> resize to `size` -> labels_from_scores (the reference
    path, kept for the processing-size scores and the tests), up to float32 rounding order.
    confidence: the probability of the chosen class (cosine: softmax(logit_scale x score) over all
    classes, before prob_thd; probability heads: the score itself).
    """
    t_start = time.perf_counter()
    height, width = size
    b, k, gy, gx = scores.shape
    ny = len(window_starts(proc_size[0], window, protocol.stride))
    nx = len(window_starts(proc_size[1], window, protocol.stride))
    if ny * nx != b:
        raise ClipfuseError(f"{b} window scores for a {ny} x {nx} window grid")
    cosine = protocol.score_type == "cosine"
    if not cosine and protocol.score_type != "probability":
        raise ClipfuseError(f"unknown score_type {protocol.score_type!r} in the manifest protocol")
    rows, cols, rband = window_geometry(height, width, proc_size[0], proc_size[1], window, protocol.stride, gy, gx)
    cband = _col_bands(height, width, proc_size[0], proc_size[1], window, protocol.stride, gy, gx)
    grid = _coarse_grid(scores.astype(np.float32, copy=False), ny, nx)
    labels = np.empty((height, width), dtype=np.int32)
    need_top = cosine and (bool(protocol.prob_thd) or want_confidence)
    confidence = np.empty((height, width), dtype=np.float32) if (want_confidence or need_top) else None
    everything = np.ones(k, dtype=bool)
    scale = float(protocol.logit_scale) if need_top else None
    only_below = float(protocol.prob_thd) if (need_top and not want_confidence) else 0.0
    if cosine and protocol.area_thd is not None and k > 1:
        _tile_pass(grid, rows, cols, rband, cband, everything, None, labels, None)
        area = np.bincount(labels.ravel(), minlength=k)
        foreground = area[1:]
        keep = np.ones(k, dtype=bool)
        keep[1:] = foreground > protocol.area_thd * foreground.sum()
        if not keep.all() or need_top:
            _tile_pass(grid, rows, cols, rband, cband, keep, scale, labels, confidence, only_below)
    else:
        _tile_pass(grid, rows, cols, rband, cband, everything, scale, labels,
                   confidence if (need_top or want_confidence) else None, only_below)
    if need_top and protocol.prob_thd:
        labels[confidence < protocol.prob_thd] = 0
    if timings is not None:
        timings["protocol"] = timings.get("protocol", 0.0) + time.perf_counter() - t_start
    return labels, (confidence if want_confidence else None)


def _col_bands(*key) -> np.ndarray:
    return _geometry_tables(*key)[3]


def window_scores_average(scores: np.ndarray, proc_size: Tuple[int, int], window: int,
                          stride: int) -> np.ndarray:
    """[B, K, gy, gx] -> [K, h, w] averaged scores at the processing size (= average_window_scores)."""
    b, k, gy, gx = scores.shape
    rows, cols, _ = window_geometry(0, 0, proc_size[0], proc_size[1], window, stride, gy, gx, to_output=False)
    ny, nx = rows.shape[1] // gy, cols.shape[1] // gx
    t = _row_major(scores, rows, cols, ny, nx)                          # [ny*gy, w*K]
    avg = (rows @ t).reshape(proc_size[0], proc_size[1], k)
    return np.ascontiguousarray(avg.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# The whole protocol
# ---------------------------------------------------------------------------------------------
@dataclass
class ProtocolOutput:
    labels: np.ndarray                   # [H, W] int32 at the original image size
    scores: Optional[np.ndarray]         # [K, h, w] float32 averaged window scores at the processing size
    processing_size: Tuple[int, int]
    num_windows: int
    num_classes: int = 0
    confidence: Optional[np.ndarray] = None  # [H, W] float32 probability of the chosen class
    timings: Optional[dict] = None           # seconds per stage (when asked for)


@dataclass
class WindowPlan:
    """One image's windows, cut and ready for the backend; `finish_windows` takes their scores.

    Split from `run_protocol` so a server can put the windows of several images through one
    backend call (clipfuse.runtime.serve)."""
    image_size: Tuple[int, int]
    processing_size: Tuple[int, int]
    boxes: List[Tuple[int, int]]
    crops: np.ndarray            # [B, window, window, 3] uint8
    window: int


def _tick(clock: Optional[dict], name: str, since: float) -> float:
    now = time.perf_counter()
    if clock is not None:
        clock[name] = clock.get(name, 0.0) + now - since
    return now


def plan_windows(image: np.ndarray, protocol: Protocol, window: int,
                 timings: Optional[dict] = None) -> WindowPlan:
    """Resize one H x W x 3 uint8 image and cut its window grid (the protocol's first half)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ClipfuseError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ClipfuseError(f"empty image {image.shape}")
    if protocol.window != window:
        # The graph's input size fixes the window; the manifest protocol must agree with it.
        raise ClipfuseError(f"protocol window {protocol.window} differs from the graph's input size "
                            f"{window}; windows cannot be overridden without re-exporting")
    t0 = time.perf_counter()
    height, width = image.shape[:2]
    size = processing_size(height, width, protocol.short_side, protocol.long_side_max)
    resized = resize_image(image, size)
    t1 = _tick(timings, "resize", t0)
    boxes = window_boxes(size[0], size[1], window, protocol.stride)
    crops = extract_windows(resized, boxes, window)
    _tick(timings, "windows", t1)
    return WindowPlan((height, width), size, boxes, crops, window)


T = TypeVar("T")


def in_chunks(call: Callable[[np.ndarray], T], batch: np.ndarray, max_batch: Optional[int] = None) -> List[T]:
    """`call` on consecutive slices of `batch` (axis 0) of at most `max_batch` rows (None or 0:
    one call); the results in order. The one chunking rule of every backend caller."""
    chunk = len(batch) if not max_batch else max(1, int(max_batch))
    return [call(batch[i:i + chunk]) for i in range(0, len(batch), chunk)]


def infer_in_chunks(infer: Callable[[np.ndarray], np.ndarray], crops: np.ndarray,
                    max_batch: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """(scores of all `crops` [B, K, g, g] float32, number of backend calls), at most `max_batch`
    windows per call (None: one call)."""
    parts = in_chunks(lambda part: np.asarray(infer(part), dtype=np.float32), crops, max_batch)
    return np.concatenate(parts, axis=0), len(parts)


def require_finite_scores(scores: np.ndarray) -> None:
    """One line instead of labels computed from NaN/Inf: every head's scores are finite (cosines or
    probabilities), so a non-finite value is a backend fault (a precision it cannot hold, a stale
    compiled blob, a broken engine), never a property of the image."""
    finite = np.isfinite(scores)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise ClipfuseError(f"the backend returned non-finite scores ({bad} of {finite.size} values are NaN "
                            "or Inf), so no labels were made; use an FP32 graph or engine (OpenVINO: "
                            "--precision fp32) or another --backend")


def finish_windows(scores: np.ndarray, plan: WindowPlan, protocol: Protocol, return_scores: bool = True,
                   return_confidence: bool = False, timings: Optional[dict] = None) -> ProtocolOutput:
    """[B, K, g, g] scores of `plan`'s windows -> labels (+ confidence, + averaged scores) at the
    original size (the protocol's second half)."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 4 or scores.shape[0] != len(plan.boxes):
        raise ClipfuseError(f"backend returned scores of shape {scores.shape}, "
                            f"expected [{len(plan.boxes)}, K, h, w]")
    require_finite_scores(scores)
    clock = {} if timings is None else timings
    labels, confidence = labels_from_window_scores(scores, plan.processing_size, plan.image_size, protocol,
                                                   plan.window, return_confidence, clock)
    avg = None
    if return_scores:
        t0 = time.perf_counter()
        avg = window_scores_average(scores, plan.processing_size, plan.window, protocol.stride)
        _tick(clock, "protocol", t0)
    return ProtocolOutput(labels=labels, scores=avg, processing_size=plan.processing_size,
                          num_windows=len(plan.boxes), num_classes=int(scores.shape[1]),
                          confidence=confidence, timings=timings)


def run_protocol(image: np.ndarray, infer: Callable[[np.ndarray], np.ndarray], protocol: Protocol,
                 window: int, max_batch: Optional[int] = None, return_scores: bool = True,
                 return_confidence: bool = False, timings: Optional[dict] = None) -> ProtocolOutput:
    """Segment one H x W x 3 uint8 image; `infer` maps [B, S, S, 3] uint8 -> [B, K, g, g] scores.

    `timings`: a dict that receives seconds per stage (resize, windows, model, protocol,
    postprocess), accumulated, for `bench --scope e2e`.
    """
    plan = plan_windows(image, protocol, window, timings)
    t0 = time.perf_counter()
    scores, _ = infer_in_chunks(infer, plan.crops, max_batch)
    _tick(timings, "model", t0)
    return finish_windows(scores, plan, protocol, return_scores, return_confidence, timings)


# The protocol fields a caller may override at run time (CLI flags, frame graphs' baked values).
OVERRIDABLE = ("short_side", "stride", "long_side_max", "logit_scale", "prob_thd", "area_thd")


def protocol_from_manifest(manifest: "ImageManifest | dict", **overrides) -> Protocol:
    """The manifest's protocol with the non-None `overrides` applied and validated."""
    section = getattr(parse_manifest(manifest), "protocol", None)
    if section is None:
        raise ClipfuseError("manifest has no protocol section; re-export the model")
    protocol = Protocol.from_dict(section)
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ClipfuseError(f"cannot override {', '.join(unknown)}; overridable: {', '.join(OVERRIDABLE)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    protocol = replace(protocol, **changes)
    if protocol.short_side <= 0 or protocol.stride <= 0:
        raise ClipfuseError("short side and window stride must be positive")
    if protocol.stride > protocol.window:
        raise ClipfuseError(f"window stride {protocol.stride} > window {protocol.window} would leave "
                            "pixels uncovered")
    if protocol.prob_thd < 0 or protocol.prob_thd > 1:
        raise ClipfuseError(f"prob_thd must be in [0, 1], got {protocol.prob_thd}")
    return protocol
