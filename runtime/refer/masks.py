"""Mask proposals: read them from files, or generate them without training.

Readers (return [N, H, W] at the image's resolution: bool, or float32 in [0, 1] for soft masks):
  - a folder of PNGs (one mask each, nonzero = inside, sorted by name), a multi-frame image
    (APNG/TIFF: one mask per frame), or one PNG label map (each nonzero id = one mask);
  - NPZ/NPY: array [N, H, W] (or [H, W]) under key "masks" or the only key; floats stay soft
    (values in [0, 1]: the global branch uses them as they are, the local crop keeps pixels == 1,
    as the public code does), integers are nonzero = inside;
  - JSON: COCO-style RLE (compressed string or uncompressed list counts) or polygons, as a list of
    RLE dicts / annotations, {"annotations": [...]}, or one RLE dict.
Generators: connected regions of a dense label map (e.g. a clipfuse dense model's argmax), or of
k-means colour clusters when no dense model is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ClipfuseError
from ..limits import (MAX_PROPOSAL_MASKS, POLYGON_VERTICES, PROPOSAL_PIXELS, PROPOSAL_STACK_BYTES,
                      RLE_RUNS)

MAX_PROPOSALS = 100          # FreeSOLO keeps at most 100 masks, as in the paper
MIN_AREA_FRACTION = 0.002    # generated regions smaller than this share of the image are noise
WORKING_SIDE = 160           # long side of the grid the generators work on

# ---------------------------------------------------------------------------------------------
# COCO segmentations


def rle_counts_from_string(s: str) -> List[int]:
    """Decode COCO's compressed RLE string (pycocotools rleFrString): 5-bit groups with a
    continuation bit, sign-extended, and counts after the second stored as deltas."""
    # pycocotools writes characters 48..111 and ends every number with a group whose
    # continuation bit (0x20) is clear; anything else is not an RLE string (and would read past
    # the end). Counts are bounded by the run limit before decoding.
    if s and (min(s) < "0" or max(s) > "o" or (ord(s[-1]) - 48) & 0x20):
        raise ClipfuseError("RLE counts string is not COCO's compressed format (characters '0'..'o')")
    RLE_RUNS.check(len(s), "RLE counts string length")
    counts: List[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _mask_size(size: Any, what: str, image_hw: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """[h, w] of a mask, checked BEFORE any allocation: positive integers, within the pixel limit,
    and equal to the image's size when it is known."""
    try:
        h, w = size
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) or
                   (isinstance(v, float) and v.is_integer()) for v in (h, w)):
            raise TypeError
        h, w = int(h), int(w)
    except (TypeError, ValueError):
        raise ClipfuseError(f"{what}: size must be two integers [h, w], got {str(size)[:40]}") from None
    if h < 1 or w < 1:
        raise ClipfuseError(f"{what}: size {h} x {w} is empty")
    PROPOSAL_PIXELS.check(h * w, f"{what} {h} x {w}")
    if image_hw is not None and (h, w) != tuple(image_hw):
        raise ClipfuseError(f"{what}: size {h} x {w} differs from the image's {image_hw[0]} x {image_hw[1]}")
    return h, w


def rle_decode(rle: Dict[str, Any], image_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """COCO RLE dict {"size": [h, w], "counts": str | list} -> bool [h, w] (column-major runs,
    starting with background). Size and counts are checked before the mask is allocated."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ClipfuseError("RLE entry needs 'size' [h, w] and 'counts'")
    h, w = _mask_size(rle["size"], "RLE", image_hw)
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise ClipfuseError("RLE counts must be a compressed string or a list of integers")
    RLE_RUNS.check(len(counts), "RLE")
    if any(c < 0 or c > h * w for c in counts):
        raise ClipfuseError("RLE counts must lie in [0, h*w]")
    total = sum(counts)
    if total != h * w:
        raise ClipfuseError(f"RLE counts sum to {total}, not h*w = {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, np.asarray(counts, dtype=np.int64)).reshape(w, h).T.copy()


def _check_polygons(polygons: Any, height: int, width: int) -> List[List[float]]:
    """COCO polygons as lists of finite floats, every vertex within one image side of the image.

    pycocotools rasterises a polygon by walking its edges pixel by pixel, so a coordinate of 1e10
    (or NaN, which it casts to a huge integer) allocates without bound or crashes inside C: the
    coordinates are checked here first. COCO's own polygons lie inside the image; the margin
    keeps polygons clipped by the image border."""
    if not isinstance(polygons, list):
        raise ClipfuseError("polygons must be a list of [x0, y0, x1, y1, ...] lists")
    out: List[List[float]] = []
    vertices = 0
    for poly in polygons:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
            raise ClipfuseError("a polygon must be a list of at least 3 x, y number pairs")
        vertices += len(poly) // 2
        POLYGON_VERTICES.check(vertices, "polygons")
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            raise ClipfuseError("polygon coordinates must be finite numbers")
        side = max(height, width)
        if (xy < -side).any() or (xy[:, 0] > width + side).any() or (xy[:, 1] > height + side).any():
            raise ClipfuseError(f"polygon coordinate outside [-{side}, side + {side}] of the "
                                f"{height} x {width} image (a fixed limit: one image side beyond the border)")
        out.append([float(v) for v in poly])
    return out


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] -> bool [h, w] (union of the parts).
    pycocotools rasterises slightly differently at the border; it is used when installed."""
    height, width = _mask_size([height, width], "polygon mask")
    polygons = _check_polygons(polygons, height, width)
    if not polygons:   # pycocotools' merge of nothing fails; no polygon is an empty mask
        return np.zeros((height, width), dtype=bool)
    try:
        from pycocotools import mask as coco_mask  # optional, exact COCO rasterisation
        rles = coco_mask.frPyObjects(polygons, height, width)
        return coco_mask.decode(coco_mask.merge(rles)).astype(bool)
    except ImportError:
        pass
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 6:
            draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)],
                         fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO annotation's `segmentation` (polygons or RLE) -> bool [h, w]."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict):
        return rle_decode(segmentation, (height, width))
    raise ClipfuseError(f"unsupported segmentation of type {type(segmentation).__name__}")


# ---------------------------------------------------------------------------------------------
# Files


def _masks_from_json(path: Path, image_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
    from ..limits import load_json_text

    try:
        data = load_json_text(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError:
        raise ClipfuseError(f"{path}: not UTF-8 JSON") from None
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ClipfuseError(f"{path}: expected a list of COCO RLE dicts or annotations")
    MAX_PROPOSAL_MASKS.check(len(data), str(path))
    masks = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ClipfuseError(f"{path}: entry {i} is not an object")
        seg = item.get("segmentation", item)
        try:
            if isinstance(seg, list):
                if "height" not in item or "width" not in item:
                    raise ClipfuseError("polygon entry needs 'height' and 'width'")
                h, w = _mask_size([item["height"], item["width"]], "polygon entry", image_hw)
                masks.append(polygons_to_mask(seg, h, w))
            else:
                masks.append(rle_decode(seg, image_hw))
        except ClipfuseError as exc:
            raise ClipfuseError(f"{path}: entry {i}: {exc}") from None
        PROPOSAL_STACK_BYTES.check(len(masks) * masks[0].size, str(path))
    if masks and len({m.shape for m in masks}) > 1:
        raise ClipfuseError(f"{path}: masks have different sizes {sorted({m.shape for m in masks})}")
    return np.stack(masks) if masks else np.zeros((0, 0, 0), dtype=bool)


def _npy_header(fileobj, what: str) -> Tuple[tuple, np.dtype]:
    """(shape, dtype) from an .npy header, read without loading the data."""
    try:
        version = np.lib.format.read_magic(fileobj)
        shape, _, dtype = np.lib.format._read_array_header(fileobj, version)  # noqa: SLF001
    except Exception as exc:  # numpy raises ValueError / OSError / SyntaxError on bad headers
        raise ClipfuseError(f"{what}: not a numpy array file ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})") from None
    return shape, dtype


def _check_array_header(shape: tuple, dtype: np.dtype, what: str,
                        image_hw: Optional[Tuple[int, int]]) -> None:
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ClipfuseError(f"{what}: masks must be a bool, integer or float array, got {dtype}")
    if len(shape) not in (2, 3):
        raise ClipfuseError(f"{what}: masks must be [N, H, W], got shape {list(shape)}")
    n = shape[0] if len(shape) == 3 else 1
    MAX_PROPOSAL_MASKS.check(n, what)
    _mask_size(list(shape[-2:]), what, None)
    PROPOSAL_STACK_BYTES.check(n * shape[-2] * shape[-1] * max(1, dtype.itemsize), what)


def _masks_from_array(path: Path, image_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
    import zipfile

    try:
        if path.suffix.lower() == ".npz":
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith(".npy")]
                keys = [n[:-4] for n in names]
                if "masks" in keys:
                    key = "masks"
                elif len(keys) == 1:
                    key = keys[0]
                else:
                    raise ClipfuseError(f"{path}: store the masks under key 'masks' (found {', '.join(keys) or 'none'})")
                with archive.open(key + ".npy") as member:
                    _check_array_header(*_npy_header(member, str(path)), str(path), image_hw)
            with np.load(path, allow_pickle=False) as archive:
                data = archive[key]
        else:
            with open(path, "rb") as f:
                _check_array_header(*_npy_header(f, str(path)), str(path), image_hw)
            data = np.load(path, allow_pickle=False)
    except ClipfuseError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError) as exc:
        raise ClipfuseError(f"{path}: cannot read ({str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__})") from None
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ClipfuseError(f"{path}: masks must be [N, H, W], got shape {list(arr.shape)}")
    if arr.dtype.kind == "f":
        return check_soft(arr.astype(np.float32), str(path))
    return arr.astype(bool)


def check_soft(masks: np.ndarray, source: str) -> np.ndarray:
    """Soft masks must be finite and within [0, 1] (the public code multiplies the image by them)."""
    if not np.isfinite(masks).all():
        raise ClipfuseError(f"{source}: soft masks hold NaN or infinite values")
    if masks.size and (masks.min() < 0 or masks.max() > 1):
        raise ClipfuseError(f"{source}: soft mask values must lie in [0, 1], found "
                            f"[{float(masks.min()):g}, {float(masks.max()):g}]")
    return masks


def hard_masks(masks: np.ndarray) -> np.ndarray:
    """Bool masks for outputs and IoU: soft values >= 0.5 count as inside (bool masks unchanged)."""
    masks = np.asarray(masks)
    return masks >= 0.5 if masks.dtype.kind == "f" else masks.astype(bool)


def _masks_from_image(path: Path) -> np.ndarray:
    try:
        img = Image.open(path)
        frames = getattr(img, "n_frames", 1)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ClipfuseError(f"{path}: cannot read image ({str(exc).splitlines()[0][:100] if str(exc) else 'corrupt'})") from None
    _mask_size([img.size[1], img.size[0]], str(path))
    MAX_PROPOSAL_MASKS.check(frames, str(path))
    PROPOSAL_STACK_BYTES.check(frames * img.size[0] * img.size[1], str(path))
    if frames > 1:
        out = []
        for i in range(frames):
            img.seek(i)
            out.append(np.asarray(img.convert("L")) > 0)
        return np.stack(out)
    arr = np.asarray(img if img.mode in ("L", "P", "I", "I;16", "1") else img.convert("L"))
    ids = [v for v in np.unique(arr) if v != 0]
    if len(ids) <= 1:
        return (arr != 0)[None]
    return np.stack([arr == v for v in ids])     # a label map: one mask per id


def load_proposals(path: "str | Path", image_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Read proposals from a folder of PNGs, an image, NPZ/NPY or COCO JSON -> bool [N, H, W].

    Every declared size is checked against the limits (clipfuse.runtime.limits) and, when
    `image_hw` is given, against the image BEFORE a mask is allocated."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".bmp", ".tif", ".tiff"))
        if not files:
            raise ClipfuseError(f"{path}: folder holds no PNG masks")
        masks = [_masks_from_image(p) for p in files]
        if len({m.shape[1:] for m in masks}) > 1:
            raise ClipfuseError(f"{path}: mask images have different sizes")
        return np.concatenate(masks)
    if not path.is_file():
        raise ClipfuseError(f"mask file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return _masks_from_json(path, image_hw)
        if suffix in (".npz", ".npy"):
            return _masks_from_array(path, image_hw)
        return _masks_from_image(path)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's corrupt-frame errors and the like
        raise ClipfuseError(f"{path}: cannot read masks ({str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__})") from None


def check_proposals(masks: np.ndarray, image_hw: Tuple[int, int],
                    source: str = "proposals") -> Tuple[np.ndarray, np.ndarray]:
    """Validate proposals against the image and drop empty masks -> (masks, kept indices).
    Bool (or integer: nonzero = inside) masks come back bool; float masks stay soft (float32,
    values checked to lie in [0, 1]); a mask is empty when no pixel is nonzero.
    Raises ClipfuseError on zero proposals, all-empty proposals or a size mismatch."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise ClipfuseError(f"{source}: zero mask proposals; pass masks with --masks or let clipfuse "
                            "generate them (omit --masks)")
    if tuple(masks.shape[1:]) != tuple(image_hw):
        raise ClipfuseError(f"{source}: masks are {masks.shape[1]}x{masks.shape[2]} (HxW) but the image "
                            f"is {image_hw[0]}x{image_hw[1]}; masks must be at the image's resolution")
    if masks.dtype.kind == "f":
        masks = check_soft(masks.astype(np.float32, copy=False), source)
    else:
        masks = masks.astype(bool, copy=False)
    keep = np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1))
    if len(keep) == 0:
        raise ClipfuseError(f"{source}: all {masks.shape[0]} masks are empty")
    return masks[keep], keep


# ---------------------------------------------------------------------------------------------
# Training-free generators


def connected_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """4-connected components of a bool [h, w] mask -> (labels int32, 0 = outside; count).
    Min-label propagation with numpy shifts: fine for the small grids generators work on."""
    h, w = mask.shape
    big = np.int64(h * w + 1)
    labels = np.where(mask, np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w), big)
    while True:
        nxt = labels.copy()
        nxt[1:] = np.minimum(nxt[1:], labels[:-1])
        nxt[:-1] = np.minimum(nxt[:-1], labels[1:])
        nxt[:, 1:] = np.minimum(nxt[:, 1:], labels[:, :-1])
        nxt[:, :-1] = np.minimum(nxt[:, :-1], labels[:, 1:])
        nxt = np.where(mask, nxt, big)
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    out = np.zeros((h, w), dtype=np.int32)
    roots = np.unique(labels[mask])
    out[mask] = np.searchsorted(roots, labels[mask]) + 1
    return out, len(roots)


def _resize_nearest(mask: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((hw[1], hw[0]), Image.NEAREST)) > 127


def proposals_from_label_maps(label_maps: Sequence[np.ndarray], image_hw: Tuple[int, int],
                              min_area_fraction: float = MIN_AREA_FRACTION,
                              max_proposals: int = MAX_PROPOSALS) -> np.ndarray:
    """Every label's whole region and each of its connected parts, from one or more label maps
    (same grid), largest first, duplicates removed, resized to the image -> bool [N, H, W]."""
    regions: List[np.ndarray] = []
    for labels in label_maps:
        for value in np.unique(labels):
            region = labels == value
            regions.append(region)
            comps, n = connected_components(region)
            if n > 1:
                regions.extend(comps == i for i in range(1, n + 1))
    if not regions:
        raise ClipfuseError("the proposal generator found no regions")
    total = regions[0].size
    regions = [r for r in regions if r.sum() >= max(1.0, min_area_fraction * total)]
    regions.sort(key=lambda r: -int(r.sum()))
    unique: List[np.ndarray] = []
    for region in regions:
        if not any(np.array_equal(region, u) for u in unique):
            unique.append(region)
        if len(unique) >= max_proposals:
            break
    return np.stack([_resize_nearest(r, image_hw) for r in unique])


def _working_size(image_hw: Tuple[int, int], side: int = WORKING_SIDE) -> Tuple[int, int]:
    h, w = image_hw
    scale = side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def kmeans_label_map(image: np.ndarray, k: int, seed: int = 0, iters: int = 15,
                     position_weight: float = 0.0) -> np.ndarray:
    """k-means (k-means++ seeding) over the colour (and optionally position) of a small copy of
    `image` -> int label map at that size. Colour only by default: connected components split
    the clusters into separate regions afterwards, and position terms cut uniform areas apart."""
    hw = _working_size(image.shape[:2])
    small = np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.float32) / 255.0
    feats = small.reshape(-1, 3)
    if position_weight:
        ys, xs = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float32) / max(hw)
        feats = np.concatenate([feats, position_weight * np.stack([ys.ravel(), xs.ravel()], 1)], 1)
    rng = np.random.default_rng(seed)
    centres = [feats[rng.integers(len(feats))]]
    for _ in range(1, k):
        d2 = ((feats[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
        if d2.sum() <= 0:
            break                      # fewer distinct colours than k
        centres.append(feats[rng.choice(len(feats), p=d2 / d2.sum())])
    centres = np.asarray(centres)
    for _ in range(iters):
        assign = ((feats[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        for c in range(len(centres)):
            members = feats[assign == c]
            if len(members):
                centres[c] = members.mean(0)
    assign = ((feats[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    return assign.reshape(hw).astype(np.int32)


def color_proposals(image: np.ndarray, ks: Sequence[int] = (2, 4, 8)) -> np.ndarray:
    """Proposals with no model at all: regions of k-means colour/position clusters."""
    return proposals_from_label_maps([kmeans_label_map(image, k) for k in ks], image.shape[:2])


def dense_label_map(model: "str | Path", image: np.ndarray, backend: str = "auto") -> np.ndarray:
    """Label map of a clipfuse dense model (its full protocol), at the generators' working size."""
    from ..segmenter import Segmenter

    with Segmenter.open(model, backend=backend) as seg:
        labels = seg.segment(np.asarray(image)).labels
    hw = _working_size(labels.shape)
    img = Image.fromarray(labels.astype(np.int32), mode="I")
    return np.asarray(img.resize((hw[1], hw[0]), Image.NEAREST)).astype(np.int32)


def generate_proposals(image: np.ndarray, dense: Optional["str | Path"] = None,
                       backend: str = "auto") -> Tuple[np.ndarray, str]:
    """Built-in proposals: regions of a dense model's label map when `dense` is given (plus colour
    clusters, which split a class into its instances), else colour clusters only."""
    maps = [kmeans_label_map(image, k) for k in (2, 4, 8)]
    source = "kmeans-colour"
    if dense is not None:
        maps.insert(0, dense_label_map(dense, image, backend))
        source = f"dense:{Path(dense).name}+kmeans-colour"
    return proposals_from_label_maps(maps, image.shape[:2]), source
