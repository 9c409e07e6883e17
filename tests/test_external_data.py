"""Graphs over protobuf's 2 GiB limit: ONNX external data end to end (export, folding, FP16,
hashes, manifest, opener, ONNX Runtime, OpenVINO, TensorRT-RTX parsing).

A real > 2 GiB tower costs GBs of RAM and disk, so the fast tests lower the documented threshold
(clipfuse.export.onnxio.SINGLE_FILE_LIMIT) below the tiny tower's weights: every code path that a
ViT-H/14 export takes runs on a 3-block ViT. One slow test writes a real > 2 GiB graph (one large
constant) through the same writer.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from clipfuse.export import onnxio
from clipfuse.export.api import ImageExportSpec, export_image_graph
from clipfuse.runtime.artifact import open_artifact
from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.fileio import sha256_file
from clipfuse.runtime.manifest import manifest_path_for, read_manifest, write_manifest

from conftest import PLAIN_VOCAB
from parity_inputs import smooth_images

# Below the tiny tower's 2.5 MB of FP32 tensors, above its 1.3 MB FP16 ones: FP32 external, FP16 one file.
LOW_LIMIT = 2_000_000


def _spec(perturbed_tiny, **kw):
    return perturbed_tiny.spec("naclip", classes=PLAIN_VOCAB, size=224, templates="single", **kw)


def _run(path, images):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, perturbed_tiny):
    """(single-file graph, external-data graph) of the same tiny NACLIP export."""
    folder = tmp_path_factory.mktemp("extdata")
    single = export_image_graph(_spec(perturbed_tiny), folder / "single" / "naclip", clip=perturbed_tiny.clip)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnxio, "SINGLE_FILE_LIMIT", LOW_LIMIT)
        external = export_image_graph(_spec(perturbed_tiny), folder / "ext" / "naclip", clip=perturbed_tiny.clip)
    return single, external


def test_limit_is_below_protobuf_maximum():
    import onnx
    assert onnxio.SINGLE_FILE_LIMIT < onnx.checker.MAXIMUM_PROTOBUF


def test_big_graph_is_written_as_graph_plus_one_data_file(pair):
    single, external = pair
    assert sorted(p.name for p in single.parent.iterdir()) == ["naclip.json", "naclip.onnx"]
    # exactly three files, no staging folder or loose tensor files left behind
    assert sorted(p.name for p in external.parent.iterdir()) == ["naclip.json", "naclip.onnx", "naclip.onnx.data"]
    m = read_manifest(manifest_path_for(external))
    data = external.with_name("naclip.onnx.data")
    assert m["onnx_data_file"] == data.name
    assert m["onnx_data_sha256"] == sha256_file(data) and m["onnx_data_bytes"] == data.stat().st_size
    assert m["onnx_sha256"] == sha256_file(external)
    assert external.stat().st_size < 200_000 < data.stat().st_size       # the weights moved out
    assert "onnx_data_file" not in read_manifest(manifest_path_for(single))
    # folding ran on the external-data graph like on the single-file one
    assert m["folding"] == read_manifest(manifest_path_for(single))["folding"]


def test_external_data_graph_computes_the_same_scores(pair):
    single, external = pair
    images = smooth_images(2, 224, seed=3)
    assert np.array_equal(_run(single, images), _run(external, images))


def test_opener_accepts_the_pair_and_refuses_a_missing_or_altered_data_file(pair, tmp_path):
    _, external = pair
    assert open_artifact(external).manifest["onnx_data_file"] == "naclip.onnx.data"
    copy = tmp_path / "copy"
    shutil.copytree(external.parent, copy)
    graph, data = copy / "naclip.onnx", copy / "naclip.onnx.data"

    data.rename(copy / "elsewhere.data")
    for verify in (True, False):
        with pytest.raises(ClipfuseError, match=r"naclip.onnx.data, which is missing") as exc:
            open_artifact(graph, verify=verify)
        assert "\n" not in str(exc.value)
    (copy / "elsewhere.data").rename(data)

    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                   # same size, one byte changed
    data.write_bytes(bytes(raw))
    with pytest.raises(ClipfuseError, match=r"naclip.onnx.data does not match its manifest"):
        open_artifact(graph)
    data.write_bytes(bytes(raw[:-10]))                           # a cut copy: caught without hashing
    with pytest.raises(ClipfuseError, match=r"bytes, its manifest says"):
        open_artifact(graph, verify=False)


def test_manifest_cannot_point_the_data_file_elsewhere(pair, tmp_path):
    _, external = pair
    copy = tmp_path / "copy"
    shutil.copytree(external.parent, copy)
    m = read_manifest(copy / "naclip.json")
    m["onnx_data_file"] = "../naclip.onnx.data"
    write_manifest(copy / "naclip.json", m)
    with pytest.raises(ClipfuseError, match="must be a file name beside"):
        open_artifact(copy / "naclip.onnx")


def test_openvino_loads_the_external_data_graph(pair):
    pytest.importorskip("openvino")
    from clipfuse.runtime.backends.openvino import OpenVINOBackend

    single, external = pair
    images = smooth_images(1, 224, seed=4)
    backend = OpenVINOBackend(external, read_manifest(manifest_path_for(external)), precision="fp32")
    got = backend.run({"image": images})["scores"]
    assert np.abs(got - _run(single, images)).max() <= 1e-4


def test_reexport_as_single_file_removes_the_stale_data_file(tmp_path, perturbed_tiny):
    out = tmp_path / "naclip"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnxio, "SINGLE_FILE_LIMIT", LOW_LIMIT)
        path = export_image_graph(_spec(perturbed_tiny), out, clip=perturbed_tiny.clip)
    assert path.with_name("naclip.onnx.data").is_file()
    export_image_graph(_spec(perturbed_tiny), out, clip=perturbed_tiny.clip)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["naclip.json", "naclip.onnx"]
    assert "onnx_data_file" not in open_artifact(path).manifest


def test_failed_export_leaves_nothing(tmp_path, perturbed_tiny, monkeypatch):
    monkeypatch.setattr(onnxio, "SINGLE_FILE_LIMIT", LOW_LIMIT)

    def broken(path):
        raise RuntimeError("checker says no")
    monkeypatch.setattr("clipfuse.export.artifacts.check_model", broken)
    with pytest.raises(RuntimeError):
        export_image_graph(_spec(perturbed_tiny), tmp_path / "naclip", clip=perturbed_tiny.clip)
    assert list(tmp_path.iterdir()) == []


def test_fp16_graph_that_fits_is_one_file_again(pair, tmp_path, monkeypatch):
    from clipfuse.export.build import BuildOptions, build
    from clipfuse.export.trt_build import BatchProfile

    monkeypatch.setattr(onnxio, "SINGLE_FILE_LIMIT", LOW_LIMIT)
    copy = tmp_path / "copy"
    shutil.copytree(pair[1].parent, copy)
    src = copy / "naclip.onnx"
    result = build(src, open_artifact(src).manifest,
                   BuildOptions(precision="fp16", trt="rtx", dry_run=True, batch=BatchProfile(1, 1, 2),
                                targets=("86",)), log=lambda m: None)
    fp16 = result.fp16_onnx
    assert not fp16.with_name(fp16.name + ".data").exists()
    m = open_artifact(fp16).manifest
    assert m["precision"] == "fp16" and "onnx_data_file" not in m and m["onnx_sha256"] == sha256_file(fp16)
    images = smooth_images(1, 224, seed=5)
    ref = _run(pair[0], images)
    assert np.abs(_run(fp16, images) - ref).max() <= 2e-2 * max(1.0, float(np.abs(ref).max()))


def test_fp16_graph_that_does_not_fit_keeps_a_data_file(pair, tmp_path, monkeypatch):
    from clipfuse.export.fp16 import convert_file

    monkeypatch.setattr(onnxio, "SINGLE_FILE_LIMIT", 200_000)
    manifest = dict(read_manifest(manifest_path_for(pair[1])))
    dst = tmp_path / "naclip.fp16.onnx"
    convert_file(pair[1], dst, manifest=manifest)
    data = tmp_path / "naclip.fp16.onnx.data"
    assert manifest["onnx_data_file"] == data.name and manifest["onnx_data_sha256"] == sha256_file(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name, data.name]


def test_engine_name_changes_when_only_the_data_file_changes(pair, tmp_path):
    """The weights of an external-data graph live in NAME.onnx.data: new weights with an unchanged
    NAME.onnx must give another engine name (an engine of the old weights must never be reused)."""
    from clipfuse.export.build import BuildOptions, build
    from clipfuse.export.trt_build import BatchProfile

    copy = tmp_path / "copy"
    shutil.copytree(pair[1].parent, copy)
    src, data = copy / "naclip.onnx", copy / "naclip.onnx.data"
    options = BuildOptions(precision="fp32", trt="rtx", dry_run=True, batch=BatchProfile(1, 1, 2), targets=("86",))

    def engine_name() -> str:
        return build(src, read_manifest(manifest_path_for(src)), options, log=lambda m: None).engine.name

    before, graph_sha = engine_name(), sha256_file(src)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                        # one weight byte: same size, same graph file
    data.write_bytes(bytes(raw))
    assert sha256_file(src) == graph_sha
    after = engine_name()
    assert after != before
    # the single-file graph keeps its plain file hash in the name (unchanged names for every existing engine)
    single = build(pair[0], read_manifest(manifest_path_for(pair[0])), options, log=lambda m: None).engine.name
    assert single.endswith(f"-{sha256_file(pair[0])[:8]}.engine")


def test_tensorrt_rtx_parses_and_builds_the_external_data_graph(pair, tmp_path):
    pytest.importorskip("polygraphy", reason="polygraphy is not installed (dev extra): no engine builds")
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception as exc:
        pytest.skip(f"tensorrt_rtx does not import ({type(exc).__name__}: {exc}); install tensorrt-rtx-cu13")
    from clipfuse.export.build import BuildOptions, build
    from clipfuse.export.trt_build import BatchProfile

    copy = tmp_path / "copy"
    shutil.copytree(pair[1].parent, copy)
    src = copy / "naclip.onnx"
    # FP32: the engine is built from the graph WITH its data file (the parser resolves it beside the graph)
    result = build(src, open_artifact(src).manifest,
                   BuildOptions(precision="fp32", trt="rtx", batch=BatchProfile(1, 1, 2), targets=("86",),
                                workspace_bytes=1 << 30), log=lambda m: None)
    assert result.built and result.engine.stat().st_size > 1_000_000   # the weights reached the engine
    section = read_manifest(manifest_path_for(result.engine))["engine"]
    assert section["onnx_sha256"] == sha256_file(src)
    assert section["onnx_data_sha256"] == sha256_file(copy / "naclip.onnx.data")
    # without the data file the parse fails with one line, not a crash
    (copy / "naclip.onnx.data").unlink()
    with pytest.raises(ClipfuseError) as exc:
        build(src, read_manifest(manifest_path_for(src)),
              BuildOptions(precision="fp32", trt="rtx", batch=BatchProfile(1, 1, 2), targets=("86",)),
              log=lambda m: None)
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_real_graph_over_2gib_round_trips(tmp_path):
    """Two 1.06 GiB constants (Gather tables; protobuf holds no single tensor over 2 GiB, and a
    big tower's weights are many tensors) through the same writer, checker and opener path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if shutil.disk_usage(tmp_path).free < 6 << 30:
        pytest.skip("needs 6 GiB of free disk for a 2.1 GiB graph written twice")
    rows = (2 ** 30 + 2 ** 26) // (4 * 1024)
    inits = []
    for i in range(2):
        table = np.zeros((rows, 1024), np.float32)
        table[-1] = 1.5 + i
        inits.append(numpy_helper.from_array(table, f"table{i}"))
        del table
    graph = helper.make_graph([helper.make_node("Gather", [f"table{i}", "idx"], [f"out{i}"]) for i in range(2)], "big",
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [1, 1024]) for i in range(2)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del inits, graph
    path, data = onnxio.write_model(model, tmp_path / "big.onnx")
    del model
    assert data is not None and data.stat().st_size > onnx.checker.MAXIMUM_PROTOBUF
    assert path.stat().st_size < 10_000
    outs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"idx": np.array([rows - 1], np.int64)})
    assert [float(o.min()) for o in outs] == [float(o.max()) for o in outs] == [1.5, 2.5]
    os.unlink(data)


def test_fuzz_data_file_fields_give_one_line_or_open(pair, tmp_path_factory):
    """Any value in the manifest's data-file fields: the opener opens or refuses in one line."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    copy = tmp_path_factory.mktemp("fuzz") / "m"
    shutil.copytree(pair[1].parent, copy)
    original = read_manifest(copy / "naclip.json")
    values = st.one_of(st.none(), st.text(max_size=40), st.integers(), st.booleans(),
                       st.lists(st.integers(), max_size=2), st.just("naclip.onnx.data"), st.just("../x"),
                       st.just("/etc/passwd"), st.just("."), st.just(""))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(name=values, sha=st.one_of(st.none(), st.text(max_size=70), st.integers()),
           size=st.one_of(st.none(), st.integers(), st.text(max_size=5)))
    def check(name, sha, size):
        m = dict(original, onnx_data_file=name, onnx_data_sha256=sha, onnx_data_bytes=size)
        write_manifest(copy / "naclip.json", m)
        for verify in (True, False):
            try:
                open_artifact(copy / "naclip.onnx", verify=verify)
            except ClipfuseError as exc:
                assert "\n" not in str(exc)
    check()


def test_type_inference_never_serializes_the_weights(monkeypatch):
    """Graph checks and the FP16 pass infer types on a weightless skeleton: onnx's shape inference
    serializes its input, which fails past protobuf's 2 GB for graphs with external data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clipfuse.export import graph_checks

    w = numpy_helper.from_array(np.ones((256, 256), np.float32), "w")    # 256 KiB, over the detach size
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [w]))
    real = onnx.shape_inference.infer_shapes
    seen = []

    def spy(m, *args, **kwargs):
        seen.append(m.ByteSize())
        return real(m, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    types = graph_checks.tensor_types(model)
    assert types["w"] == TensorProto.FLOAT and types["y"] == TensorProto.FLOAT
    assert seen and max(seen) < 16 * 1024, seen
