"""Issue 13: fuzz-style checks of the image decoder and the CLI option parser (hypothesis).

Whatever a hostile user feeds in, `clipfuse` answers with exit code 0 or 2, at most one line on
stderr, and writes nothing outside -o; the decoder returns an H x W x 3 uint8 array or raises
ClipfuseError, nothing else. Seeds are derandomised so CI is repeatable; the example counts keep
the file under ~1 minute on 2 cores.
"""
from __future__ import annotations

import io
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clipfuse.runtime.cli import build_parser, main  # noqa: E402
from clipfuse.runtime.errors import ClipfuseError  # noqa: E402
from clipfuse.runtime.imageio import read_image  # noqa: E402

def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _encoded() -> dict:
    """Small valid files of every format the decoder meets, as the seeds to mutate."""
    rng = np.random.default_rng(0)
    photo = np.cumsum(rng.integers(0, 6, (24, 32, 3)), axis=1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(photo)
    seeds = {}
    for fmt, kwargs, conv in (("PNG", {}, None), ("JPEG", {"quality": 80}, None),
                              ("JPEG", {"progressive": True}, None), ("GIF", {}, "P"), ("BMP", {}, None),
                              ("TIFF", {"compression": "tiff_deflate"}, None), ("WEBP", {}, None),
                              ("PNG", {}, "I;16"), ("PNG", {}, "1"), ("PNG", {}, "RGBA"), ("PPM", {}, None)):
        buf = io.BytesIO()
        (img.convert(conv) if conv else img).save(buf, format=fmt, **kwargs)
        suffix = {"JPEG": ".jpg", "TIFF": ".tif", "PPM": ".ppm"}.get(fmt, "." + fmt.lower())
        seeds[f"{fmt}-{conv}-{len(seeds)}{suffix}"] = buf.getvalue()
    return seeds


SEEDS = _encoded()


@st.composite
def malformed(draw):
    """(name, bytes): a seed file truncated, with bytes overwritten, or with its header's numbers
    (sizes, lengths, counts) replaced by extreme values."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "header", "extend"]))
        if kind == "truncate" and len(data) > 1:
            del data[draw(st.integers(1, len(data) - 1)):]
        elif kind == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        elif kind == "header" and len(data) > 8:
            at = draw(st.integers(0, min(len(data), 64) - 4))
            value = draw(st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFF, 64000, 0xFFFFFFFF, 0x80000000]))
            width = draw(st.sampled_from([2, 4]))
            data[at:at + width] = value.to_bytes(4, draw(st.sampled_from(["big", "little"])))[-width:]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
    return name, bytes(data)


@fuzz(400)
@given(malformed())
def test_decoder_returns_rgb_or_clipfuse_error(tmp_path, sample):
    name, data = sample
    path = tmp_path / name
    path.write_bytes(data)
    try:
        arr = read_image(path, max_pixels=4_000_000)
    except ClipfuseError as exc:
        assert "\n" not in str(exc)
        return
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.size > 0


# --- the CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_clip):
    pytest.importorskip("onnxruntime")
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    root = tmp_path_factory.mktemp("fuzz")
    export_image_graph(ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none",
                                       classes=[["background"], ["sky"],
                       ["road"]], templates="single", seed=0), root / "engines" / "m", clip=tiny_clip)
    return root


_counter = itertools.count()


def run_cli(sandbox: Path, capfd, argv_after_model, image_name: str, image_bytes: bytes):
    """Run `clipfuse run MODEL IMAGE -o OUT ...` in a fresh folder; check the three promises.
    stderr is read at the file-descriptor level: C libraries (libtiff) write there directly."""
    work = sandbox / f"case{next(_counter)}"
    work.mkdir()
    (work / "in").mkdir()
    (work / "in" / image_name).write_bytes(image_bytes)
    model = sandbox / "engines" / "m.onnx"
    before = {p: p.stat().st_mtime_ns for p in sandbox.rglob("*") if p.is_file()}
    out = work / "out"
    argv = ["run", str(model), str(work / "in" / image_name), "-o", str(out), *argv_after_model]
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capfd.readouterr().err.strip().splitlines()
    assert code in (0, 2), (argv, code, err)
    assert len(err) == 1, (argv, err)
    after = {p: p.stat().st_mtime_ns for p in sandbox.rglob("*") if p.is_file()}
    changed = [p for p in after if before.get(p) != after[p]]
    assert all(out in p.parents for p in changed), (argv, changed)   # nothing written outside -o
    assert not [p for p in changed if p.name.endswith(".part")], changed
    shutil.rmtree(work)
    return code


@fuzz(25)
@given(malformed())
def test_cli_run_on_malformed_images(sandbox, capfd, sample):
    name, data = sample
    run_cli(sandbox, capfd, ["--no-overlay"], name, data)


def test_cli_run_on_a_corrupt_tiff_is_one_line(sandbox, capfd):
    """libtiff prints "ZIPDecode: ..." on fd 2 itself; the decoder folds it into its one line."""
    data = bytearray(SEEDS[next(k for k in SEEDS if k.startswith("TIFF"))])
    for i in range(20, 60):
        data[i] ^= 0x55
    assert run_cli(sandbox, capfd, [], "bad.tif", bytes(data)) == 2


NUMERIC = ["--short-side", "--long-side-max", "--window-stride", "--logit-scale", "--prob-thd", "--area-thd",
           "--batch", "--threads", "--max-pixels"]
VALUES = st.one_of(
    st.sampled_from(["-1", "0", "1", "2", "0.5", "nan", "inf", "-inf", "1e999", "-0", "abc", "", " ", "40",
                     "112", "224", "1e-9", "65", "0x10", "1_0", "--", "-", "9" * 30]),
    st.integers(-1000, 1000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6))


@fuzz(30)
@given(st.lists(st.tuples(st.sampled_from(NUMERIC + ["--classes", "--templates", "--backend"]), VALUES),
                max_size=3))
def test_cli_run_option_parser(sandbox, capfd, options):
    argv = [f"{opt}={value}" for opt, value in options]
    photo = np.full((40, 56, 3), 120, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    run_cli(sandbox, capfd, ["--no-overlay", *argv], "p.png", buf.getvalue())


COMMAND_NUMERIC = {
    "export": (["--head", "sclip", "--classes", "a", "-o", "x"], ["--size", "--gaussian-sigma", "--seed", "--opset"]),
    "export-text": (["-o", "x"], ["--seed", "--opset"]),
    "export-refer": (["-o", "x"], ["--masked-blocks", "--alpha", "--seed", "--opset"]),
    "build": (["m.onnx"], ["--workspace-gb", "--opt-level"]),
    "bench": ([], ["--warmup", "--iters", "--max-seconds", "--min-iters", "--threads", "--seed"]),
    "eval": (["m.onnx"], ["--limit"]),
    "refer": ([], ["--alpha"]),
    "eval-refer": ([], ["--alpha", "--limit"]),
    "compare": (["a.onnx", "b.onnx", "--images", "x.png"], ["--max-images"]),
    "serve": (["m.onnx"], ["--http-port", "--grpc-port", "--metrics-port", "--instances", "--max-batch-size",
                           "--queue-delay-us", "--window-batch", "--drain-timeout", "--threads", "--max-pixels",
                           "--log-verbose"]),
    "triton-repo": (["m.onnx", "-o", "r"], ["--instances", "--protocol-instances", "--max-batch-size",
                                            "--window-batch", "--queue-delay-us", "--max-pixels"]),
    "bench-serve": (["m.onnx"], ["--clients", "--requests", "--instances", "--max-batch-size", "--queue-delay-us",
                                 "--window-batch", "--threads", "--baseline-requests"]),
}


@fuzz(250)  # ~20 per command
@given(st.sampled_from(sorted(COMMAND_NUMERIC)), st.data())
def test_every_commands_numbers_parse_to_finite_values_or_one_line(command, data):
    import contextlib
    import math
    required, options = COMMAND_NUMERIC[command]
    option = data.draw(st.sampled_from(options))
    value = data.draw(VALUES)
    capture = io.StringIO()
    with contextlib.redirect_stderr(capture):
        try:
            args = build_parser().parse_args([command, *required, f"{option}={value}"])
        except SystemExit as exc:
            assert exc.code == 2
            assert len(capture.getvalue().strip().splitlines()) == 1
            return
    parsed = getattr(args, option.lstrip("-").replace("-", "_"))
    assert isinstance(parsed, (int, float)) and math.isfinite(parsed)
    assert parsed >= 0, (option, value, parsed)


@fuzz(60)
@given(st.sampled_from(["--budget"]), VALUES)
def test_gpu_check_options_parse_to_finite_values_or_one_line(option, value):
    """The GPU acceptance script's numbers: in range, or one line and exit 2 (never a run)."""
    import contextlib
    import math

    from clipfuse.benchmarks.gpu_check import build_parser as gpu_check_parser
    capture = io.StringIO()
    with contextlib.redirect_stderr(capture):
        try:
            args = gpu_check_parser().parse_args(["-o", "x", f"{option}={value}"])
        except SystemExit as exc:
            assert exc.code == 2
            assert len(capture.getvalue().strip().splitlines()) == 1
            return
    assert math.isfinite(args.budget) and 30 <= args.budget <= 3600
