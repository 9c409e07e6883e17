"""What `clipfuse run` writes per image: label map PNG, colour overlay PNG with a legend, shares JSON.

- `NAME.labels.png`: palette PNG whose pixel values ARE the class indices (<= 256 classes; beyond,
  a 16-bit grayscale PNG of the indices). Viewers show the palette colours; numpy reads indices:
  `np.array(Image.open(p))`.
- `NAME.overlay.png`: the photo blended with the class colours, with a legend of the classes
  present (largest share first) on the right.
- `NAME.json`: per-class pixel counts and shares (fractions of the image).
Colours: the PASCAL VOC colour map (class 0 black), the convention of segmentation tools.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .fileio import atomic_path, write_text_atomic

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


def save_label_png(path: Path, labels: np.ndarray, num_classes: int) -> None:
    from PIL import Image
    if num_classes <= 256:
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[:num_classes] = palette(num_classes)
        img.putpalette(pal.ravel().tolist())
    else:
        img = Image.fromarray(labels.astype(np.uint16))  # 16-bit grayscale PNG of the indices
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


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
    canvas = overlay_image(image, labels, class_names)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def save_shares_json(path: Path, labels: np.ndarray, class_names: Sequence[str], source: str = "",
                     extra: Dict = None) -> None:
    data = {"image": source, "height": int(labels.shape[0]), "width": int(labels.shape[1]),
            "classes": class_shares(labels, class_names)}
    if extra:
        data.update(extra)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
