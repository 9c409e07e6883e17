"""What `clipfuse run` writes per image: label map PNG, colour overlay PNG with a legend, shares JSON.

- `NAME.labels.png`: palette PNG whose pixel values ARE the class indices (<= 256 classes; beyond,
  a 16-bit grayscale PNG of the indices). Viewers show the palette colours; numpy reads indices:
  `np.array(Image.open(p))`.
- `NAME.overlay.png`: the photo blended with the class colours, with a legend of the classes
  present (largest share first) on the right.
- `NAME.json`: per-class pixel counts and shares (fractions of the image).
Colours: the PASCAL VOC colour map (class 0 black), the convention of segmentation tools.

The files of one image are written as a set (`write_image_outputs`): all encoded in memory first,
then renamed into place together with the JSON last, so an image's outputs are complete or absent.
Their names are reserved: `collect_inputs` of `clipfuse run` skips `*.labels.png` and
`*.overlay.png` in folders, so running into the input folder twice does not segment the outputs.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .fileio import write_bytes_atomic, write_file_set

LABELS_SUFFIX = ".labels.png"
OVERLAY_SUFFIX = ".overlay.png"
SHARES_SUFFIX = ".json"
OUTPUT_SUFFIXES = (LABELS_SUFFIX, OVERLAY_SUFFIX)  # image files clipfuse writes (never inputs)

OVERLAY_ALPHA = 0.5


def palette(num_classes: int) -> np.ndarray:
    """[num_classes, 3] uint8 PASCAL VOC colour map (bit-interleaved class index)."""
    colours = np.zeros((max(num_classes, 1), 3), dtype=np.uint8)
    for k in range(num_classes):
        r = g = b = 0
        c = k
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[k] = (r, g, b)
    return colours[:num_classes]


def class_shares(labels: np.ndarray, class_names: Sequence[str]) -> List[Dict]:
    """Per-class pixel count and share, largest first; classes with no pixel are left out."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    total = float(labels.size) or 1.0
    order = np.argsort(-counts, kind="stable")
    return [{"id": int(k), "name": class_names[k], "pixels": int(counts[k]),
             "share": round(float(counts[k]) / total, 6)} for k in order if counts[k] > 0]


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def label_png_bytes(labels: np.ndarray, num_classes: int) -> bytes:
    from PIL import Image
    if num_classes <= 256:
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[:num_classes] = palette(num_classes)
        img.putpalette(pal.ravel().tolist())
    else:
        img = Image.fromarray(labels.astype(np.uint16))  # 16-bit grayscale PNG of the indices
    return _png_bytes(img)


def save_label_png(path: Path, labels: np.ndarray, num_classes: int) -> None:
    write_bytes_atomic(path, label_png_bytes(labels, num_classes))


def overlay_image(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                  alpha: float = OVERLAY_ALPHA):
    """PIL image: photo blended with class colours, legend panel on the right."""
    from PIL import Image, ImageDraw, ImageFont

    colours = palette(len(class_names))
    blend = (image.astype(np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha)
    photo = Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    shares = class_shares(labels, class_names)
    font = ImageFont.load_default()
    line = 16
    swatch = 12
    text_w = max([int(ImageDraw.Draw(photo).textlength(f"{s['name']} {100 * s['share']:.1f}%", font=font))
                  for s in shares] + [40])
    legend_w = swatch + text_w + 16
    height = max(photo.height, line * len(shares) + 8)
    canvas = Image.new("RGB", (photo.width + legend_w, height), (255, 255, 255))
    canvas.paste(photo, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = photo.width + 6
    for row, share in enumerate(shares):
        y = 4 + row * line
        draw.rectangle([x0, y + 1, x0 + swatch, y + 1 + swatch], fill=tuple(int(c) for c in colours[share["id"]]),
                       outline=(0, 0, 0))
        draw.text((x0 + swatch + 4, y), f"{share['name']} {100 * share['share']:.1f}%", fill=(0, 0, 0), font=font)
    return canvas


def save_overlay_png(path: Path, image: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    write_bytes_atomic(path, _png_bytes(overlay_image(image, labels, class_names)))


def shares_json_bytes(labels: np.ndarray, class_names: Sequence[str], source: str = "",
                      extra: Optional[Dict] = None) -> bytes:
    data = {"image": source, "height": int(labels.shape[0]), "width": int(labels.shape[1]),
            "classes": class_shares(labels, class_names)}
    if extra:
        data.update(extra)
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def save_shares_json(path: Path, labels: np.ndarray, class_names: Sequence[str], source: str = "",
                     extra: Optional[Dict] = None) -> None:
    write_bytes_atomic(path, shares_json_bytes(labels, class_names, source, extra))


def output_paths(base: Path, overlay: bool = True) -> List[Path]:
    """The files written for output stem `base` (OUT/NAME), the JSON last."""
    names = [LABELS_SUFFIX] + ([OVERLAY_SUFFIX] if overlay else []) + [SHARES_SUFFIX]
    return [base.with_name(base.name + suffix) for suffix in names]


def write_image_outputs(base: Path, image: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                        overlay: bool = True, source: str = "", extra: Optional[Dict] = None) -> List[Path]:
    """Write NAME.labels.png, NAME.overlay.png (if `overlay`) and NAME.json as one set."""
    paths = output_paths(base, overlay)
    blobs = [label_png_bytes(labels, len(class_names))]
    if overlay:
        blobs.append(_png_bytes(overlay_image(image, labels, class_names)))
    blobs.append(shares_json_bytes(labels, class_names, source, extra))
    write_file_set(dict(zip(paths, blobs)))
    return paths
