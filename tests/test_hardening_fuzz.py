"""Issue 13: fuzz-style checks of the image decoder and the CLI option parser (hypothesis).

Whatever a hostile user feeds in, `clipfuse` answers with exit code 0 or 2, at most one line on
stderr, and writes nothing outside -o; the decoder returns an H x W x 3 uint8 array or raises
ClipfuseError, nothing else. Seeds are derandomised so CI is repeatable; the example counts keep
the file under ~1 minute on 2 cores.
"""
from __future__ import annotations

import io
import json
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


def _dest(command: str, option: str) -> str:
    """Where argparse stores `option` of `command` (head options have prefixed dests)."""
    import argparse
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return next(a.dest for a in sub._actions if option in a.option_strings)


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
    parsed = getattr(args, _dest(command, option))
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


# --- round two: upper bounds of numeric options, request shapes, proposals, manifests, resume ----
BOUNDED = {  # option -> the limit that bounds it (clipfuse.runtime.limits)
    "--instances": "INSTANCES", "--protocol-instances": "INSTANCES", "--max-batch-size": "MAX_BATCH_SIZE",
    "--window-batch": "WINDOW_BATCH", "--queue-delay-us": "QUEUE_DELAY_US", "--drain-timeout": "DRAIN_TIMEOUT_S",
    "--threads": "THREADS", "--max-pixels": "SERVE_MAX_PIXELS_CAP", "--clients": "BENCH_CLIENTS",
    "--requests": "BENCH_REQUESTS", "--baseline-requests": "BENCH_REQUESTS", "--log-verbose": "LOG_VERBOSE"}
HUGE = st.one_of(st.integers(-10, 10**13).map(str), st.sampled_from(["1e9", "10**9", "4294967296", "65"]))


@fuzz(150)
@given(st.sampled_from(["serve", "triton-repo", "bench-serve"]), st.data())
def test_serving_options_stay_within_their_limits(command, data):
    import contextlib
    from clipfuse.runtime import limits
    required, options = COMMAND_NUMERIC[command]
    option = data.draw(st.sampled_from([o for o in options if o in BOUNDED]))
    value = data.draw(HUGE)
    capture = io.StringIO()
    with contextlib.redirect_stderr(capture):
        try:
            args = build_parser().parse_args([command, *required, f"{option}={value}"])
        except SystemExit as exc:
            assert exc.code == 2 and len(capture.getvalue().strip().splitlines()) == 1
            return
    parsed = getattr(args, option.lstrip("-").replace("-", "_"))
    assert 0 <= parsed <= getattr(limits, BOUNDED[option]).value, (option, value)


SHAPES = st.lists(st.one_of(st.integers(-3, 5000), st.sampled_from([0, 3, 10**5, 2**31, 2**63 - 1])),
                  min_size=0, max_size=6)
DTYPES = st.sampled_from(["UINT8", "FP32", "BYTES", "INT64", "", "uint8"])


@fuzz(300)
@given(SHAPES, DTYPES, st.one_of(st.none(), st.integers(-5, 10**9)), st.integers(0, 10**6),
       st.sampled_from(["image", "x", ""]), st.one_of(st.none(), st.lists(st.integers(0, 255), max_size=40)))
def test_http_request_shapes_checked_before_triton(shape, dtype, binary_size, binary_bytes, name, data):
    from clipfuse.runtime.serve.front import RequestBounds, check_http_infer
    bounds = RequestBounds(max_pixels=4096 * 4096, max_batch=8)
    item = {"name": name, "shape": shape, "datatype": dtype}
    if binary_size is not None:
        item["parameters"] = {"binary_data_size": binary_size}
    else:
        item["data"] = data
    try:
        check_http_infer({"inputs": [item]}, binary_bytes if binary_size is not None else 0, bounds)
    except ClipfuseError as exc:
        assert "\n" not in str(exc)
        return
    count = int(np.prod(shape, dtype=object))
    assert all(d >= 1 for d in shape) and count <= bounds.max_elements
    if name == "image":
        assert len(shape) == 4 and shape[0] <= 8 and shape[1] * shape[2] <= bounds.max_pixels


@fuzz(200)
@given(SHAPES, DTYPES, st.lists(st.binary(max_size=64), max_size=3), st.binary(max_size=64))
def test_grpc_request_shapes_checked_before_triton(shape, dtype, raw, junk):
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2
    from clipfuse.runtime.serve.front import RequestBounds, check_grpc_infer
    bounds = RequestBounds(max_pixels=4096 * 4096, max_batch=8)
    request = service_pb2.ModelInferRequest(model_name="m")
    try:
        request.inputs.add(name="image", datatype=dtype, shape=shape)
    except ValueError:   # shape values outside int64: protobuf itself refuses them
        return
    request.raw_input_contents.extend(raw)
    for payload in (request.SerializeToString(), junk):
        try:
            check_grpc_infer(payload, bounds)
        except ClipfuseError as exc:
            assert "\n" not in str(exc)
            continue
        assert payload is not junk or junk == b"" or True
        assert all(d >= 1 for d in shape) and int(np.prod(shape, dtype=object)) <= bounds.max_elements


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**12, 10**12),
                    st.sampled_from([0, 1, 59, 60, 79, 80, 1e308, -1e10]))


@fuzz(200)
@given(st.lists(st.lists(NUMBERS, max_size=12), max_size=3), st.integers(-2, 100), st.integers(-2, 100))
def test_polygons_are_refused_or_rasterised_at_the_image_size(polygons, height, width):
    from clipfuse.runtime.refer.masks import polygons_to_mask
    try:
        mask = polygons_to_mask(polygons, height, width)
    except ClipfuseError as exc:
        assert "\n" not in str(exc)
        return
    assert mask.shape == (height, width) and mask.dtype == bool


RLE = st.fixed_dictionaries({"size": st.one_of(st.lists(NUMBERS, max_size=3), st.text(max_size=4)),
                             "counts": st.one_of(st.lists(st.integers(-5, 10**6), max_size=8),
                                                 st.text(max_size=12), st.just("!!!!"), NUMBERS)})


@fuzz(200)
@given(st.lists(st.one_of(RLE, st.fixed_dictionaries({"segmentation": st.lists(st.lists(NUMBERS, max_size=8), max_size=2),
                                                      "height": NUMBERS, "width": NUMBERS})), max_size=3))
def test_proposal_json_refused_or_decoded(tmp_path_factory, entries):
    from clipfuse.runtime.refer.masks import load_proposals
    path = tmp_path_factory.mktemp("prop") / "p.json"
    path.write_text(json.dumps(entries, allow_nan=True))
    try:
        masks = load_proposals(path, (6, 8))
    except ClipfuseError as exc:
        assert "\n" not in str(exc)
        return
    assert masks.ndim == 3 and (len(masks) == 0 or masks.shape[1:] == (6, 8))


@fuzz(150)
@given(st.binary(max_size=300), st.sampled_from([".npz", ".npy"]))
def test_proposal_arrays_refused_or_loaded(tmp_path_factory, data, suffix):
    from clipfuse.runtime.refer.masks import load_proposals
    buf = io.BytesIO()
    np.savez(buf, masks=np.zeros((2, 6, 8), bool)) if suffix == ".npz" else np.save(buf, np.zeros((2, 6, 8), bool))
    seed = bytearray(buf.getvalue())
    for i, b in enumerate(data[:40]):           # overwrite header bytes, then append the rest
        seed[(i * 7) % len(seed)] = b
    path = tmp_path_factory.mktemp("arr") / f"m{suffix}"
    path.write_bytes(bytes(seed) + data[40:])
    try:
        masks = load_proposals(path, (6, 8))
    except ClipfuseError as exc:
        assert "\n" not in str(exc)
        return
    assert masks.ndim == 3


JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8)),
                       lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                       max_leaves=20)


@fuzz(150)
@given(st.data())
def test_manifest_mutations_are_refused_or_read(tmp_path_factory, data):
    import json as _json
    from clipfuse.runtime.manifest import FORMAT, FORMAT_VERSION, read_manifest
    base = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "image", "inputs": [], "outputs": []}
    key = data.draw(st.sampled_from(sorted(base) + ["protocol", "classes", "engine"]))
    base[key] = data.draw(JSONISH)
    text = _json.dumps(base, allow_nan=True)
    if data.draw(st.booleans()):
        text = "[" * data.draw(st.integers(1, 50_000)) + text
    path = tmp_path_factory.mktemp("man") / "m.json"
    path.write_text(text)
    try:
        assert isinstance(read_manifest(path), dict)
    except ClipfuseError as exc:
        assert "\n" not in str(exc)


@fuzz(200)
@given(st.data())
def test_typed_manifest_mutations_are_refused_or_round_trip(data):
    """A committed manifest with one field (or one engine/head/tensor field) replaced by any JSON
    value: parse_manifest gives the kind's dataclass, which writes the same JSON back, or refuses
    with one line."""
    import json as _json
    from clipfuse.runtime.manifest import parse_manifest
    fixtures = sorted((Path(__file__).parent / "data" / "manifests").glob("*.json"))
    raw = _json.loads(data.draw(st.sampled_from(fixtures)).read_text())
    raw["engine"] = {"sha256": "0" * 64, "flavour": "rtx", "batch_profile": [1, 2, 4]}
    where = data.draw(st.sampled_from(["top", "engine", "head", "input"]))
    target = {"top": raw, "engine": raw["engine"], "head": raw.get("head") or raw,
              "input": raw["inputs"][0]}[where]
    key = data.draw(st.one_of(st.sampled_from(sorted(target)), st.text(max_size=6)))
    target[key] = data.draw(JSONISH)
    try:
        meta = parse_manifest(raw, "m.json")
    except ClipfuseError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("m.json")
        return
    assert _json.dumps(meta.to_dict(), allow_nan=True) == _json.dumps(raw, allow_nan=True)


@fuzz(150)
@given(st.data())
def test_resume_file_mutations_are_refused_or_loaded(tmp_path_factory, data):
    import json as _json
    from clipfuse.runtime.eval.report import FORMAT, FORMAT_VERSION, EvalRecord
    base = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": {}, "confusion": {"a": [[1, 0], [0, 1]]},
            "done_ids": ["x"]}
    key = data.draw(st.sampled_from(sorted(base) + ["agreement"]))
    base[key] = data.draw(JSONISH)
    path = tmp_path_factory.mktemp("res") / "results.json"
    path.write_text(_json.dumps(base, allow_nan=True))
    try:
        EvalRecord.start(path, {"num_classes": 2, "runs": ["a"]}, resume=True)
    except ClipfuseError as exc:
        assert "\n" not in str(exc)
