"""Read any photo a user points at into an H x W x 3 uint8 RGB array, or fail with one clear line.

Handled: JPEG, PNG, WebP, BMP, TIFF and whatever else Pillow decodes; EXIF orientation (the pixels
are turned the way viewers show them); grayscale, palette, CMYK and 16-bit images (16-bit is scaled
to 8 bits by its full range 0..65535, not stretched per image); RGBA/LA: the alpha channel is
DROPPED (the colour under transparent pixels is used as it is), because CLIP was trained on opaque
photos and compositing on a made-up background would invent content.

Huge images: Pillow's decompression-bomb guard is replaced by clipfuse's own limit (`max_pixels`).
A JPEG above it is decoded at 1/2, 1/4 or 1/8 scale by the DCT itself (`draft`, bounded memory);
any other format above it is refused with the limit in the message. The limit is checked on the
size the header DECLARES, before decoding, and a header that declares more pixels than the file's
bytes can hold is refused (`check_declared_size`); decoding converts in strips of rows, so peak
memory is the decoded image (1-4 bytes per pixel in Pillow) plus the 3-byte RGB result, ~7 bytes
per pixel at most (~630 MB at the default limit), whatever the format or bit depth.
"""
from __future__ import annotations

import contextlib
import os
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np

from .errors import ClipfuseError

# Pillow's own default (89.5 Mpx, ~256 MB as RGB). Above this a JPEG is reduced, others refused.
DEFAULT_MAX_PIXELS = 89_478_485

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


# Rows converted at a time: conversion temporaries stay ~1M pixels whatever the image size.
_STRIP_PIXELS = 1 << 20
# zlib's deflate cannot expand data more than ~1032x, so a PNG's compressed bytes bound its size.
_DEFLATE_MAX_RATIO = 1032
# EXIF orientation -> the same turn on an H x W x C array (Pillow's exif_transpose table).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _strip_to_rgb8(strip, mode: str, top: float) -> np.ndarray:
    """One strip of rows in any Pillow mode -> rows x W x 3 uint8 (or rows x W gray)."""
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(strip).astype(np.int64)
        if top == 255.0:
            return np.clip(arr, 0, 255).astype(np.uint8)
        # round(x * 255 / 65535) in integers: no float copies; exact (no ties: 65535 is odd)
        return ((np.clip(arr, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F":
        arr = np.asarray(strip, dtype=np.float64)
        return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    if mode == "P" or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Palette images may carry transparency; through RGBA so alpha is dropped consistently.
        strip = strip.convert("RGBA").convert("RGB")  # alpha dropped (see module docstring)
    elif mode != "RGB":
        strip = strip.convert("RGB")
    return np.asarray(strip, dtype=np.uint8)


def _to_rgb8(img) -> np.ndarray:
    """Any Pillow mode -> H x W x 3 uint8 RGB, converted in strips of rows so the only full-size
    allocations are the decoded image and the result (peak memory ~ 4-8 + 3 bytes per pixel)."""
    mode = img.mode
    width, height = img.size
    top = 255.0
    if mode.startswith("I;16"):
        top = 65535.0  # 16-bit: scaled by the full range 0..65535, not stretched per image
    elif mode == "I":
        top = 65535.0 if (img.getextrema()[1] or 0) > 255 else 255.0
    elif mode == "F":
        top = 1.0 if (img.getextrema()[1] or 0) <= 1.0 else 255.0
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        part = _strip_to_rgb8(img.crop((0, y0, width, y1)), mode, top)
        out[y0:y1] = part[:, :, None] if part.ndim == 2 else part
    return out


def check_declared_size(path: Path, fmt: Optional[str], width: int, height: int) -> None:
    """Refuse a file whose header declares more pixels than its bytes can hold.

    Lower bounds on the data a real image needs: a JPEG at least 1 bit per 8x8 luma block (the
    smallest Huffman code of a block's DC difference); a PNG at least its 1-bit-per-pixel rows
    divided by deflate's maximum ratio. A forged or truncated header fails these by orders of
    magnitude (a 28 KB JPEG claiming 64000x64000 needs >= 8 MB); libjpeg would otherwise "decode"
    it by padding with grey, at the full declared cost in memory.
    """
    size = path.stat().st_size
    if fmt == "JPEG":
        need = ((width + 7) // 8) * ((height + 7) // 8) // 8
    elif fmt == "PNG":
        need = height * (1 + (width + 7) // 8) // _DEFLATE_MAX_RATIO
    else:
        return
    if size < need:
        raise ClipfuseError(f"{path} declares {width}x{height} pixels but holds only {size} bytes "
                            f"(a {fmt} that size needs >= {need}): truncated or forged header")


def read_image(path: Union[str, Path], max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               exif_transpose: bool = True) -> np.ndarray:
    """Decode `path` to an H x W x 3 uint8 RGB array (upright per EXIF; `exif_transpose=False`
    keeps the stored pixel order, which is what COCO-style annotations are drawn on).

    Raises ClipfuseError for missing, unreadable, corrupt or non-image files, for files whose
    declared size their data cannot hold, and for non-JPEG images larger than `max_pixels`
    (None = no limit). Peak memory is bounded by the declared size, checked before decoding.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ClipfuseError(f"image not found: {path}")
    if path.is_dir():
        raise ClipfuseError(f"{path} is a folder, not an image")
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a message that says what to do
    notes: List[str] = []
    c_messages: List[str] = []
    try:
        with _c_stderr_captured(c_messages):
            return _decode(path, max_pixels, notes, exif_transpose)
    except ClipfuseError:
        raise
    except UnidentifiedImageError:
        raise ClipfuseError(f"{path} is not an image Pillow can read (unknown or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as exc:
        # Truncated / corrupt data surfaces as OSError ("image file is truncated", "broken data
        # stream"); malformed headers of some formats as struct/Index/Type errors inside Pillow.
        detail = f" ({c_messages[0]})" if c_messages else ""
        raise ClipfuseError(f"cannot decode image {path}: {exc}{detail}") from None
    except MemoryError:
        raise ClipfuseError(f"not enough memory to decode image {path}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
        for note in notes:
            print(note, file=sys.stderr)


def _decode(path: Path, max_pixels: Optional[int], notes: List[str], exif_transpose: bool = True) -> np.ndarray:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBomb (our own limit) and corrupt-EXIF notices
        with Image.open(path) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise ClipfuseError(f"image {path} is empty ({width}x{height})")
            check_declared_size(path, img.format, width, height)
            if max_pixels is not None and width * height > max_pixels:
                if img.format == "JPEG":
                    img.draft("RGB", _draft_target(path, width, height, max_pixels))
                    notes.append(f"clipfuse: {path.name} is {width}x{height}; decoded at "
                                 f"{img.size[0]}x{img.size[1]} (limit {max_pixels} pixels)")
                else:
                    raise ClipfuseError(
                        f"image {path} is {width}x{height} = {width * height} pixels, above "
                        f"the limit of {max_pixels} pixels (raise --max-pixels or downscale it)")
            orientation = img.getexif().get(0x0112) if exif_transpose else None
            img.load()
            rgb = _to_rgb8(img)
    # the decoded image is freed here, before the turn makes its copy
    turn = _ORIENT.get(orientation) if isinstance(orientation, int) else None
    return np.ascontiguousarray(turn(rgb)) if turn else rgb


@contextlib.contextmanager
def _c_stderr_captured(messages: List[str]) -> Iterator[None]:
    """Collect into `messages` what C libraries print straight to file descriptor 2 while decoding (libtiff
    writes "ZIPDecode: Decoding error ..." there), so a bad file still gives ONE line: the
    first such message is folded into the ClipfuseError, warnings of a good file are dropped.
    (Output of other threads during the decode would be collected too; the CLI has none.)"""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(4096).decode("utf-8", "replace")
            messages.extend(line.strip() for line in text.splitlines() if line.strip())


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
