"""clipfuse.runtime.imageio: formats, orientation, modes, corrupt files and the size limit."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.imageio import read_image


def photo(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt,suffix,kwargs", [("PNG", ".png", {}), ("BMP", ".bmp", {}),
                                               ("WEBP", ".webp", {"lossless": True}), ("TIFF", ".tif", {})])
def test_lossless_formats_round_trip_exactly(tmp_path, fmt, suffix, kwargs):
    arr = photo()
    path = tmp_path / f"img{suffix}"
    Image.fromarray(arr).save(path, format=fmt, **kwargs)
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == (40, 60, 3)
    assert np.array_equal(got, arr)


def test_jpeg_reads_close_to_source(tmp_path):
    arr = np.full((32, 48, 3), (200, 40, 90), np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    got = read_image(tmp_path / "a.jpg")
    assert got.shape == (32, 48, 3) and np.abs(got.astype(int) - arr).max() <= 3


@pytest.mark.parametrize("orientation,turn", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                              (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1])])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    arr = photo(30, 50)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(arr).save(path, exif=exif.tobytes())
    assert np.array_equal(read_image(path), turn(arr))


def test_grayscale_palette_and_cmyk(tmp_path):
    gray = photo()[:, :, 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    got = read_image(tmp_path / "g.png")
    assert np.array_equal(got, np.repeat(gray[:, :, None], 3, axis=2))

    pal = Image.fromarray(photo()).quantize(16)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))

    Image.fromarray(photo()).convert("CMYK").save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg").shape == (40, 60, 3)


def test_rgba_alpha_is_dropped(tmp_path):
    rgba = np.concatenate([photo(), np.zeros((40, 60, 1), np.uint8)], axis=2)  # fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    assert np.array_equal(read_image(tmp_path / "t.png"), rgba[:, :, :3])


def test_sixteen_bit_is_scaled_by_full_range(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")  # I;16 PNG
    got = read_image(tmp_path / "d.png")
    assert got[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.array_equal(got[..., 0], got[..., 2])


def test_corrupt_and_non_image_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(photo(200, 200)).save(good, quality=90)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:600])
    with pytest.raises(ClipfuseError, match="cannot decode image .*cut.jpg"):
        read_image(truncated)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    with pytest.raises(ClipfuseError, match="not an image Pillow can read"):
        read_image(text)
    with pytest.raises(ClipfuseError, match="image not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ClipfuseError, match="is a folder"):
        read_image(tmp_path)


def test_huge_images_refused_or_drafted(tmp_path, capsys):
    big = photo(400, 600)
    Image.fromarray(big).save(tmp_path / "big.png")
    with pytest.raises(ClipfuseError, match="above the limit"):
        read_image(tmp_path / "big.png", max_pixels=100_000)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    got = read_image(tmp_path / "big.jpg", max_pixels=100_000)   # JPEG: DCT-reduced decode
    assert got.shape == (200, 300, 3)
    assert "decoded at 300x200" in capsys.readouterr().err
    assert read_image(tmp_path / "big.jpg", max_pixels=None).shape == (400, 600, 3)
    # Pillow's global guard is restored afterwards
    assert Image.MAX_IMAGE_PIXELS is not None
