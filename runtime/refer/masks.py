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

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ClipfuseError

MAX_PROPOSALS = 100          # FreeSOLO keeps at most 100 masks, as in the paper
MIN_AREA_FRACTION = 0.002    # generated regions smaller than this share of the image are noise
WORKING_SIDE = 160           # long side of the grid the generators work on

# ---------------------------------------------------------------------------------------------
# COCO segmentations


def rle_counts_from_string(s: str) -> List[int]:
    """Decode COCO's compressed RLE string (pycocotools rleFrString): 5-bit groups with a
    continuation bit, sign-extended, and counts after the second stored as deltas."""
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


def rle_decode(rle: Dict[str, Any]) -> np.ndarray:
    """COCO RLE dict {"size": [h, w], "counts": str | list} -> bool [h, w] (column-major runs,
    starting with background)."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ClipfuseError("RLE entry needs 'size' [h, w] and 'counts'") from None
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ClipfuseError(f"RLE counts sum to {int(counts.sum())}, not h*w = {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T.copy()


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] -> bool [h, w] (union of the parts).
    pycocotools rasterises slightly differently at the border; it is used when installed."""
    try:
        from pycocotools import mask as coco_mask  # optional, exact COCO rasterisation
        rles = coco_mask.frPyObjects([list(map(float, p)) for p in polygons], height, width)
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
        mask = rle_decode(segmentation)
        if mask.shape != (height, width):
            raise ClipfuseError(f"RLE size {list(mask.shape)} differs from the image's {[height, width]}")
        return mask
    raise ClipfuseError(f"unsupported segmentation of type {type(segmentation).__name__}")


# ---------------------------------------------------------------------------------------------
# Files


def _masks_from_json(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClipfuseError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ClipfuseError(f"{path}: expected a list of COCO RLE dicts or annotations")
    masks = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ClipfuseError(f"{path}: entry {i} is not an object")
        seg = item.get("segmentation", item)
        if isinstance(seg, list):
            if "height" not in item or "width" not in item:
                raise ClipfuseError(f"{path}: polygon entry {i} needs 'height' and 'width'")
            masks.append(polygons_to_mask(seg, int(item["height"]), int(item["width"])))
        else:
            masks.append(rle_decode(seg))
    if masks and len({m.shape for m in masks}) > 1:
        raise ClipfuseError(f"{path}: masks have different sizes {sorted({m.shape for m in masks})}")
    return np.stack(masks) if masks else np.zeros((0, 0, 0), dtype=bool)


def _masks_from_array(path: Path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ClipfuseError(f"{path}: cannot read ({exc})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        keys = list(data.keys())
        if "masks" in keys:
            key = "masks"
        elif len(keys) == 1:
            key = keys[0]
        else:
            raise ClipfuseError(f"{path}: store the masks under key 'masks' (found {', '.join(keys)})")
        data = data[key]
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
    except OSError as exc:
        raise ClipfuseError(f"{path}: cannot read image ({exc})") from None
    frames = getattr(img, "n_frames", 1)
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


def load_proposals(path: "str | Path") -> np.ndarray:
    """Read proposals from a folder of PNGs, an image, NPZ/NPY or COCO JSON -> bool [N, H, W]."""
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
    if suffix == ".json":
        return _masks_from_json(path)
    if suffix in (".npz", ".npy"):
        return _masks_from_array(path)
    return _masks_from_image(path)


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
