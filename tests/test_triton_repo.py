"""`clipfuse triton-repo`: the repository's Python-backend models load and answer in the
tritonserver bundled with nvidia-pytriton (127.0.0.1, stopped by the test); the ONNX Runtime and
TensorRT models cannot load there (those backends are not in the wheel), so their configs are
checked against Triton's model-config schema (tritonclient's model_config_pb2)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from serve_helpers import (FRAME, LOOPBACK, concurrently, free_ports, serve_deps_missing, smooth_image, tiny_sclip,
                           tiny_sclip_frame, wait_until)

_MISSING = serve_deps_missing()
if _MISSING:
    pytest.skip(_MISSING, allow_module_level=True)

import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from clipfuse.runtime import Segmenter  # noqa: E402
from clipfuse.runtime.cli import main  # noqa: E402
from clipfuse.runtime.errors import ClipfuseError  # noqa: E402
from clipfuse.runtime.fileio import sha256_file  # noqa: E402
from clipfuse.runtime.serve.pbtxt import parse_config  # noqa: E402
from clipfuse.runtime.serve.repository import validate_config  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    pytest.importorskip("torch")
    return tiny_sclip(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def frame_artifact(tmp_path_factory):
    pytest.importorskip("torch")
    return tiny_sclip_frame(tmp_path_factory.getbasetemp())


def test_frame_graph_is_one_model_with_its_own_contract(frame_artifact, tmp_path):
    repo = tmp_path / "repo"
    assert main(["triton-repo", f"frm={frame_artifact}", "-o", str(repo), "--device", "cpu"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["frm"]          # no protocol model: it is inside
    cfg = _config(repo, "frm")
    assert cfg.platform == "onnxruntime_onnx" and [t.name for t in cfg.input] == ["frames"]
    assert list(cfg.input[0].dims) == [FRAME[0], FRAME[1], 3] and cfg.input[0].data_type == mc.TYPE_UINT8
    assert [(t.name, t.data_type) for t in cfg.output] == [("labels", mc.TYPE_INT32), ("confidence", mc.TYPE_FP32),
                                                          ("scores", mc.TYPE_FP32)]
    assert list(cfg.output[0].dims) == list(FRAME)
    assert cfg.parameters["clipfuse_kind"].string_value == "frame"
    assert (repo / "frm" / "1" / "model.onnx").read_bytes() == frame_artifact.read_bytes()


def _config(repo, name):
    return parse_config((repo / name / "config.pbtxt").read_text())


def test_onnx_repository_config(artifact, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton-repo", f"seg={artifact}", "-o", str(repo), "--device", "cpu", "--instances", "2",
                 "--window-batch", "12"]) == 0
    assert "checked against Triton's model-config schema" in capsys.readouterr().err
    windows = _config(repo, "seg_windows")
    assert windows.platform == "onnxruntime_onnx" and windows.max_batch_size == 12
    assert list(windows.input[0].dims) == [224, 224, 3] and windows.input[0].data_type == mc.TYPE_UINT8
    assert list(windows.output[0].dims) == [4, 14, 14] and windows.output[0].data_type == mc.TYPE_FP32
    assert windows.instance_group[0].count == 2 and windows.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert windows.HasField("dynamic_batching")
    assert (repo / "seg_windows" / "1" / "model.onnx").read_bytes() == artifact.read_bytes()
    proto = _config(repo, "seg")
    assert proto.backend == "python" and proto.parameters["clipfuse_windows_model"].string_value == "seg_windows"
    assert proto.parameters["clipfuse_window_batch"].string_value == "12"
    assert json.loads(proto.parameters["clipfuse_classes"].string_value)[1] == ["cat"]
    assert (repo / "seg" / "1" / "clipfuse" / "runtime" / "protocol.py").is_file()


def test_engine_repository_config(artifact, tmp_path):
    """A .engine becomes a tensorrt_plan model with the profile's max batch (file not opened)."""
    engine = tmp_path / "sclip.engine"
    engine.write_bytes(b"not a real plan: triton-repo copies it, only Triton's TensorRT backend reads it")
    manifest = json.loads(artifact.with_suffix(".json").read_text())
    manifest["engine"] = {"sha256": sha256_file(engine), "batch_profile": [1, 4, 24]}
    engine.with_suffix(".json").write_text(json.dumps(manifest))
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(engine), "-o", str(repo)]) == 0
    plan = _config(repo, "sclip_windows")
    assert plan.platform == "tensorrt_plan" and plan.max_batch_size == 24
    assert plan.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert (repo / "sclip_windows" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert _config(repo, "sclip").parameters["clipfuse_window_batch"].string_value == "24"


def test_schema_check_can_fail(artifact, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(artifact), "-o", str(repo)]) == 0
    model_dir = repo / "sclip_windows"
    good = (model_dir / "config.pbtxt").read_text()
    for bad, message in [(good.replace("max_batch_size", "max_batch"), "schema"),
                         (good.replace("TYPE_UINT8", "TYPE_UINT7"), "schema"),
                         (good.replace("onnxruntime_onnx", "onnxruntime_onnxx"), "unknown platform")]:
        with pytest.raises(ClipfuseError, match=message):
            validate_config(bad, model_dir)
    (model_dir / "1" / "model.onnx").unlink()
    with pytest.raises(ClipfuseError, match="1/model.onnx"):
        validate_config(good, model_dir)
    # an existing non-empty output is refused, and nothing half-written is left
    assert main(["triton-repo", str(artifact), "-o", str(repo)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.fixture(scope="module")
def bundled_server(artifact, frame_artifact, tmp_path_factory):
    from clipfuse.runtime.serve import bundled
    root = tmp_path_factory.mktemp("triton_repo")
    repo = root / "repo"
    assert main(["triton-repo", f"seg={artifact}", f"frm={frame_artifact}", "-o", str(repo), "--windows-backend", "python",
                 "--protocol-instances", "2", "--window-batch", "8", "--max-pixels", str(1000 * 1000)]) == 0
    http, grpc, metrics = free_ports(3)
    proc = bundled.start(repo, root, http, grpc, metrics, log=root / "tritonserver.log")
    client = thttp.InferenceServerClient(f"{LOOPBACK}:{http}")
    try:
        wait_until(lambda: proc.poll() is None and client.is_server_ready(), 90, "tritonserver ready")
        yield http, grpc
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except Exception:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root / "backends", ignore_errors=True)


def test_bundled_triton_answers_like_local_runtime(bundled_server, artifact):
    http, grpc = bundled_server
    images = [smooth_image(150, 200, s) for s in range(4)] + [smooth_image(260, 180, 9)]
    def client(i):
        if i % 2:
            c = tgrpc.InferenceServerClient(f"{LOOPBACK}:{grpc}")
            x = tgrpc.InferInput("image", [1, *images[i].shape], "UINT8")
        else:
            c = thttp.InferenceServerClient(f"{LOOPBACK}:{http}")
            x = thttp.InferInput("image", [1, *images[i].shape], "UINT8")
        x.set_data_from_numpy(images[i][None])
        try:
            return c.infer("seg", [x]).as_numpy("labels")[0]
        finally:
            c.close()

    results = concurrently(client, len(images))
    with Segmenter.open(artifact) as local:
        for image, labels in zip(images, results):
            assert labels is not None
            np.testing.assert_array_equal(labels, local.segment(image).labels)
    # an oversized image gets a Triton error; the server keeps serving
    c = thttp.InferenceServerClient(f"{LOOPBACK}:{http}")
    try:
        x = thttp.InferInput("image", [1, 1100, 1000, 3], "UINT8")
        x.set_data_from_numpy(np.zeros((1, 1100, 1000, 3), np.uint8))
        with pytest.raises(InferenceServerException, match="above the limit of"):
            c.infer("seg", [x])
        assert c.is_model_ready("seg") and c.is_model_ready("seg_windows")
        x = thttp.InferInput("image", [1, *images[0].shape], "UINT8")
        x.set_data_from_numpy(images[0][None])
        np.testing.assert_array_equal(c.infer("seg", [x]).as_numpy("labels")[0], results[0])
    finally:
        c.close()


def test_bundled_triton_serves_a_frame_graph_as_is(bundled_server, frame_artifact):
    http, _ = bundled_server
    frames = np.stack([smooth_image(*FRAME, s) for s in range(3)])
    c = thttp.InferenceServerClient(f"{LOOPBACK}:{http}")
    try:
        x = thttp.InferInput("frames", list(frames.shape), "UINT8")
        x.set_data_from_numpy(frames)
        r = c.infer("frm", [x])
        labels, confidence = r.as_numpy("labels"), r.as_numpy("confidence")
    finally:
        c.close()
    with Segmenter.open(frame_artifact) as local:
        for frame, got, conf in zip(frames, labels, confidence):
            ref = local.segment(frame, return_confidence=True)
            np.testing.assert_array_equal(got, ref.labels)
            np.testing.assert_allclose(conf, ref.confidence, atol=1e-6)


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_python_stub_links_this_interpreters_libpython(tmp_path):
    """The libpython trap (docs/serving.md#serving-one-machine): with the environment clipfuse
    gives tritonserver, the Python-backend stub resolves libpython3.X from the running
    interpreter's LIBDIR."""
    import os
    import subprocess
    import sysconfig
    from clipfuse.runtime.serve import bundled
    _, backends, env = bundled.prepare(tmp_path)
    out = subprocess.run(["ldd", str(backends / "python" / "triton_python_backend_stub")], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    line = next(l for l in out.splitlines() if "libpython" in l)
    resolved = line.split("=>")[1].split("(")[0].strip()
    assert os.path.dirname(resolved) == sysconfig.get_config_var("LIBDIR"), line
