"""Read any photo a user points at into an H x W x 3 uint8 RGB array, or fail with one clear line.

Handled: JPEG, PNG, WebP, BMP, TIFF and whatever else Pillow decodes; EXIF orientation (the pixels
are turned the way viewers show them); grayscale, palette, CMYK and 16-bit images (16-bit is scaled
to 8 bits by its full range 0..65535, not stretched per image); RGBA/LA: the alpha channel is
DROPPED (the colour under transparent pixels is used as it is), because CLIP was trained on opaque
photos and compositing on a made-up background would invent content.

Huge images: Pillow's decompression-bomb guard is replaced by clipfuse's own limit (`max_pixels`).
A JPEG above it is decoded at 1/2, 1/4 or 1/8 scale by the DCT itself (`draft`, bounded memory);
any other format above it is refused with the limit in the message.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import ClipfuseError

# Pillow's own default (89.5 Mpx, ~256 MB as RGB). Above this a JPEG is reduced, others refused.
DEFAULT_MAX_PIXELS = 89_478_485

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def _to_rgb8(img) -> np.ndarray:
    """Any Pillow mode -> H x W x 3 uint8 RGB."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: Pillow's convert("L") clips instead of scaling.
        arr = np.asarray(img)
        scale = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(arr.astype(np.float64) * (255.0 / scale)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P":
        # Palette images may carry transparency; go through RGBA so it is dropped consistently.
        img = img.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.mode == "RGBA":
        img = img.convert("RGBA").convert("RGB")  # alpha dropped (see module docstring)
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_image(path: Union[str, Path], max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = True) -> np.ndarray:
    """Decode `path` to an H x W x 3 uint8 RGB array (upright per EXIF; `exif_transpose=False`
    keeps the stored pixel order, which is what COCO-style annotations are drawn on).

    Raises ClipfuseError for missing, unreadable, corrupt or non-image files and for non-JPEG
    images larger than `max_pixels` (None = no limit).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ClipfuseError(f"image not found: {path}")
    if path.is_dir():
        raise ClipfuseError(f"{path} is a folder, not an image")
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a message that says what to do
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    if img.format == "JPEG":
                        img.draft("RGB", _draft_target(path, width, height, max_pixels))
                        print(f"clipfuse: {path.name} is {width}x{height}; decoded at "
                              f"{img.size[0]}x{img.size[1]} (limit {max_pixels} pixels)", file=sys.stderr)
                    else:
                        raise ClipfuseError(
                            f"image {path} is {width}x{height} = {width * height / 1e6:.0f} Mpx, above "
                            f"the limit of {max_pixels / 1e6:.0f} Mpx (raise --max-pixels or downscale it)")
                img.load()
                if exif_transpose:
                    img = ImageOps.exif_transpose(img) or img
                return _to_rgb8(img)
    except ClipfuseError:
        raise
    except UnidentifiedImageError:
        raise ClipfuseError(f"{path} is not an image Pillow can read (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated / corrupt data surfaces as OSError ("image file is truncated", "broken data stream").
        raise ClipfuseError(f"cannot decode image {path}: {exc}") from None
    except MemoryError:
        raise ClipfuseError(f"not enough memory to decode image {path}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _draft_target(path: Path, width: int, height: int, max_pixels: int) -> tuple:
    """The size to ask `draft` for: the mildest DCT reduction (1/2, 1/4, 1/8) that fits the limit.

    Pillow's draft picks the largest power-of-two reduction that keeps the image >= the request.
    """
    for n in (2, 4, 8):
        if (width // n) * (height // n) <= max_pixels:
            break
    else:
        raise ClipfuseError(f"image {path} is {width}x{height}: too large even at 1/8 scale "
                            f"(limit {max_pixels} pixels; raise --max-pixels)")
    return (max(1, width // n), max(1, height // n))


def is_image_path(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
