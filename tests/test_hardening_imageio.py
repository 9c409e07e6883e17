"""Issue 13 item 7: decoder memory is bounded by the declared size; forged sizes are refused."""
from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.imageio import read_image


def forged_jpeg(path, width: int, height: int) -> None:
    """A real 64x64 JPEG whose SOF0 header claims width x height."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)       # SOF0: FF C0, length, precision, Y, X
    path.write_bytes(bytes(data))


def test_forged_jpeg_size_is_refused_not_decoded(tmp_path):
    path = tmp_path / "forged.jpg"
    forged_jpeg(path, 64000, 64000)                             # 1/8 draft would still be 8000x8000
    with pytest.raises(ClipfuseError, match="declares 64000x64000 pixels but holds only"):
        read_image(path)


def test_forged_png_size_is_refused(tmp_path):
    path = tmp_path / "forged.png"
    Image.new("L", (64, 64), 7).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, 9000, 9000)               # IHDR width, height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))   # and a valid CRC: only the data lies
    path.write_bytes(bytes(data))
    with pytest.raises(ClipfuseError, match="9000x9000"):
        read_image(path)


def test_small_real_images_pass_the_size_check(tmp_path):
    """The bounds are lower bounds: the most compressible real files still pass."""
    Image.new("1", (3000, 2000), 1).save(tmp_path / "flat1.png", optimize=True)
    Image.new("L", (2048, 2048), 128).save(tmp_path / "flat.jpg", quality=5)
    assert read_image(tmp_path / "flat1.png").shape == (2000, 3000, 3)
    assert read_image(tmp_path / "flat.jpg").shape == (2048, 2048, 3)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child of a large pytest
# process starts with the parent's peak and a grown peak would read as 0 (the test could not fail).
# VmHWM belongs to the new address space that exec creates.
PEAK = textwrap.dedent("""
    import sys
    import numpy as np
    from PIL import Image
    from clipfuse.runtime.imageio import read_image
    def hwm_kb():
        return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    base = hwm_kb()
    arr = read_image(sys.argv[1], max_pixels=int(sys.argv[2]))
    grown = hwm_kb() - base
    print(arr.shape[0] * arr.shape[1], grown * 1024)
""")


@pytest.mark.parametrize("mode", ["I;16", "1"])
def test_decoder_peak_memory_is_a_few_bytes_per_pixel(tmp_path, mode):
    """16-bit grey (was ~21 bytes/pixel: float64 copies) and 1-bit (was ~11): now decoded image
    (<= 4 B/px) + RGB result (3 B/px), converted in strips."""
    path = tmp_path / "big.png"
    Image.new(mode, (4000, 3000), 1000 if mode == "I;16" else 1).save(path)
    proc = subprocess.run([sys.executable, "-c", PEAK, str(path), str(4000 * 3000)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pixels, grown = map(int, proc.stdout.split())
    assert pixels == 12_000_000
    assert grown / pixels <= 8.0, f"peak grew {grown / pixels:.1f} bytes per pixel"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    """The turn is done on the array (after the decoded image is freed): same pixels as Pillow's."""
    arr = np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(arr).save(path, exif=exif.tobytes())
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    assert np.array_equal(read_image(path), expected)


def test_sixteen_bit_and_float_scaling_unchanged(tmp_path):
    """Integer strip scaling gives the previous float formula's values exactly."""
    ramp = np.arange(0, 65536, 7, dtype=np.uint16)[: 100 * 90].reshape(100, 90)
    Image.fromarray(ramp).save(tmp_path / "r.png")
    expected = np.clip(np.rint(ramp.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    got = read_image(tmp_path / "r.png")
    assert np.array_equal(got, np.repeat(expected[:, :, None], 3, axis=2))
    flt = np.linspace(0, 1, 50 * 40, dtype=np.float32).reshape(50, 40)
    Image.fromarray(flt, mode="F").save(tmp_path / "f.tif")
    exp_f = np.clip(np.rint(flt.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    assert np.array_equal(read_image(tmp_path / "f.tif")[:, :, 0], exp_f)
