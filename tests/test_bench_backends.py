"""The bench's backend table over the runtime registry: every registry row opened by
runtime.artifact with the artifact's own manifest (the FP16 graph: its fp16 manifest), driven
through the runner interface only (stage / launch / synchronize / run / device_memory_bytes)."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the bench rows run on ONNX Runtime (pip install 'clipfuse[ort]')")
torch = pytest.importorskip("torch", reason="exporting the test graph needs torch (the export extra)")

from clipfuse.benchmarks import backends as bb  # noqa: E402
from clipfuse.runtime.artifact import open_artifact  # noqa: E402
from clipfuse.runtime.backends import base  # noqa: E402
from clipfuse.runtime.fileio import sha256_file  # noqa: E402

from conftest import TINY  # noqa: E402
from parity_inputs import perturb_, smooth_image  # noqa: E402

SIZE = 32
CLASSES = [["background"], ["sky"], ["tree", "bush"], ["road"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    from clipfuse.export.weights import load_clip
    clip = load_clip(TINY, "none", seed=0)
    perturb_(clip.model, 1, bias_std=0.05, gain=(0.85, 1.15))
    spec = ImageExportSpec("sclip", model=TINY, pretrained="none", classes=CLASSES, size=SIZE,
                           templates="single", seed=0)
    return export_image_graph(spec, tmp_path_factory.mktemp("bench-backends") / "sclip", clip=clip)


def _ctx(exported: Path, tmp_path: Path) -> bb.BenchContext:
    return bb.BenchContext(build=None, onnx_path=exported, manifest=open_artifact(exported).manifest,
                           workdir=tmp_path, threads=1, torch_device="cpu", max_batch=2)


def _probe(n: int = 2) -> np.ndarray:
    return np.stack([smooth_image(SIZE, SIZE, seed=i) for i in range(n)])


def test_fp16_graph_is_opened_with_its_own_fp16_manifest(exported, tmp_path):
    ctx = _ctx(exported, tmp_path)
    fp16, fp32 = bb.open_runner("ort-cpu-fp16", ctx), bb.open_runner("ort-cpu-fp32", ctx)
    try:
        graph, manifest = fp16.backend.artifact, fp16.backend.manifest
        assert graph.name.endswith(".fp16.onnx")
        # its own manifest: precision, file hash and conversion report of the FP16 graph, not the
        # FP32 manifest with the precision field overwritten
        assert fp16.precision == manifest["precision"] == "fp16"
        assert manifest["onnx_sha256"] == sha256_file(graph) != sha256_file(exported)
        assert manifest["source_onnx_sha256"] == sha256_file(exported)
        assert manifest["fp16"]["nodes"] > 0
        assert fp32.precision == fp32.backend.manifest["precision"] == "fp32"
        images = _probe()
        a, b = fp16.infer(images), fp32.infer(images)
        assert a.shape == b.shape == (2, len(CLASSES), SIZE // 16, SIZE // 16)
        np.testing.assert_allclose(a, b, atol=5e-2)
        assert float(np.std(b)) > 1e-3   # perturbed weights, smooth images: scores that vary
    finally:
        fp16.close()
        fp32.close()


class _Recorder(base.Backend):
    """A registry backend that only has the runner interface: anything else the bench touched
    would raise AttributeError."""
    name = "recorder"

    def __init__(self, artifact, manifest, backend="recorder", **options) -> None:
        super().__init__(artifact, manifest, **options)
        self.log = []

    def run(self, feeds):
        self.log.append(("run", feeds["image"].shape))
        return {"scores": np.full((len(feeds["image"]), 2), 7.0, np.float32)}

    def stage(self, feeds):
        self.log.append(("stage", feeds["image"].shape))

    def launch(self):
        self.log.append("launch")

    def synchronize(self):
        self.log.append("sync")

    def device_memory_bytes(self):
        return 3 << 20

    def close(self):
        self.log.append("close")


def test_a_row_is_a_registry_backend_driven_through_the_runner_interface(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(base._REGISTRY, "recorder", (_Recorder.__module__, "_Recorder", (".onnx",)))
    monkeypatch.setitem(bb.BENCH_BACKENDS, "recorder-fp32", bb._row("Recorder FP32", "recorder", "fp32", knob=7))
    runner = bb.open_runner("recorder-fp32", _ctx(exported, tmp_path))
    backend = runner.backend
    assert isinstance(backend, _Recorder) and backend.options == {"knob": 7}
    assert backend.manifest == open_artifact(exported).manifest
    assert (runner.label, runner.device, runner.precision) == ("Recorder FP32", "cpu", "fp32")
    images = _probe()
    runner.prepare(images)
    runner.call()
    runner.sync()
    assert runner.infer(images)[0, 0] == 7.0
    assert runner.device_peak_mb() == 3.0
    runner.close()
    assert backend.log == [("stage", images.shape), "launch", "sync", ("run", images.shape), "close"]


def test_every_row_names_a_registry_backend_that_opens_its_graph():
    registry = base.available_backends()
    for name, row in bb.BENCH_BACKENDS.items():
        if row.backend is None:
            assert row.graph == "torch" and name.startswith("torch-"), name
            continue
        assert row.backend in registry, name
        suffix = ".engine" if row.graph == "engine" else ".onnx"
        assert row.graph in ("fp32", "fp16", "engine"), name
        assert suffix in base._registry()[row.backend][2], name
        assert name.startswith(row.backend), name


def test_openvino_row_stages_once_and_launches_on_the_bound_input(exported, tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'clipfuse[openvino]')")
    runner = bb.open_runner("openvino-fp32", _ctx(exported, tmp_path))
    try:
        backend = runner.backend
        images = _probe()
        expected = backend.run({"image": images[::-1].copy()})["scores"]
        runner.prepare(images[::-1].copy())
        runner.call()
        runner.sync()
        # the launch computed the staged batch (the request's output, read directly here only)
        got = np.array(backend.request.get_output_tensor(0).data, copy=True)
        np.testing.assert_allclose(got, expected, rtol=0, atol=0)
        assert runner.device_peak_mb() is None
    finally:
        runner.close()


def test_synchronize_returns_nothing_on_every_backend():
    for name in base.available_backends():
        try:
            cls = base._load_class(name)
        except Exception:
            continue   # not importable here; its module's own tests say why
        ret = inspect.signature(cls.synchronize).return_annotation
        assert ret in (None, "None"), (name, ret)
    b = _Recorder.__mro__[1](Path("x.onnx"), {})   # base.Backend's host defaults
    b.run = lambda feeds: {"scores": feeds["image"] * 2}
    b.stage({"image": np.ones(2)})
    b.launch()
    assert b.synchronize() is None and b.device_memory_bytes() is None


# what the bench may use of a runtime backend: base.Backend's runner interface
INTERFACE = {"stage", "launch", "synchronize", "run", "close", "device_memory_bytes", "name", "precision",
             "max_batch", "manifest", "artifact"}


def test_bench_reaches_into_no_backend_internals():
    root = Path(bb.__file__).parent
    internals = re.compile(r"\w\.(session|request|_binding)\b")
    attribute = re.compile(r"\b(?:backend|be)\.(\w+)")
    for path in sorted(root.rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0].replace("urllib.request", "")
            where = f"{path.relative_to(root)}:{lineno}: {line.strip()}"
            assert not internals.search(code), where
            assert set(attribute.findall(code)) <= INTERFACE, where
