"""ONNX Runtime CUDA / TensorRT EP backend (clipfuse.runtime.backends.ort_cuda).

On every machine: why it is unavailable (the exact line), provider options, the CUDA-graph
fallback, the refusal of ONNX Runtime's silent CPU fall-back, and the resident-buffer IOBinding
logic itself, run on the CPU EP with CPU OrtValues (same code, device "cpu") against a plain
session. On a GPU machine with onnxruntime-gpu: parity of image, FP16, frame, text and refer
graphs against ONNX Runtime CPU, with and without CUDA-graph replay; elsewhere those skip with
ort_cuda.unavailable_reason()."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from clipfuse.runtime.errors import ClipfuseError

ort = pytest.importorskip("onnxruntime")
from clipfuse.runtime.backends import open_backend, ort_cuda  # noqa: E402
from clipfuse.runtime.manifest import read_manifest  # noqa: E402

VOCAB = [["sky"], ["tree", "bush"], ["road"]]


class _FakeOrt:
    __version__ = "9.9.9"

    def __init__(self, providers):
        self._providers = providers

    def get_available_providers(self):
        return list(self._providers)


def test_unavailable_reasons_are_exact_lines(monkeypatch):
    cpu = _FakeOrt(["CPUExecutionProvider"])
    assert ort_cuda.unavailable_reason("ort-cuda", cpu, sm="90") == (
        "onnxruntime 9.9.9 has no CUDAExecutionProvider (the CPU build; providers: CPUExecutionProvider): "
        "install onnxruntime-gpu instead of onnxruntime (pip install 'clipfuse[gpu]'; never both)")
    gpu = _FakeOrt(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_cuda.unavailable_reason("ort-cuda", gpu, sm=None) == (
        "no CUDA GPU visible (cuda-python / nvidia-smi): ONNX Runtime's CUDA EP needs one")
    assert ort_cuda.unavailable_reason("ort-cuda", gpu, sm="90") is None
    monkeypatch.setattr(ort_cuda, "tensorrt_libraries", lambda: None)
    assert ort_cuda.unavailable_reason("ort-trt", gpu, sm="90") == (
        "ONNX Runtime's TensorRT EP needs the TensorRT libraries (libnvinfer), which do not load here: "
        "install TensorRT, or use --backend ort-cuda")
    monkeypatch.setattr(ort_cuda, "tensorrt_libraries", lambda: "libnvinfer.so.10")
    assert ort_cuda.unavailable_reason("ort-trt", gpu, sm="87") is None
    no_trt = _FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "use ort-cuda" in ort_cuda.unavailable_reason("ort-trt", no_trt, sm="90")


def _bare(name: str, manifest: dict, artifact: str = "/m/g.onnx"):
    b = object.__new__(ort_cuda.OrtCudaBackend)
    b.name, b.manifest, b.artifact = name, manifest, Path(artifact)
    return b


def test_provider_options():
    manifest = {"inputs": [{"name": "image", "shape": ["batch", 224, 224, 3]}]}
    plain = _bare("ort-cuda", manifest)._providers({"cuda_graph": False})
    assert plain[0][0] == "CUDAExecutionProvider" and "enable_cuda_graph" not in plain[0][1]
    assert plain[0][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE" and plain[-1] == "CPUExecutionProvider"
    graph = _bare("ort-cuda", manifest)._providers({"cuda_graph": True, "device_id": 1})
    assert graph[0][1]["enable_cuda_graph"] == "1" and graph[0][1]["device_id"] == 1
    trt = _bare("ort-trt", manifest)._providers({"cuda_graph": True, "fp16": True, "batch_profile": [1, 4, 8]})
    name, opts = trt[0]
    assert name == "TensorrtExecutionProvider" and [p[0] for p in trt[1:2]] == ["CUDAExecutionProvider"]
    assert opts["trt_fp16_enable"] is True and opts["trt_cuda_graph_enable"] is True
    assert opts["trt_profile_min_shapes"] == "image:1x224x224x3" and opts["trt_profile_max_shapes"] == "image:8x224x224x3"
    assert opts["trt_engine_cache_path"] == str(Path("/m/g.ort-trt-cache"))


def test_cuda_graph_refusal_falls_back_to_plain_and_other_errors_propagate():
    calls = []

    def create(providers):
        calls.append(providers)
        if providers == "graph":
            raise RuntimeError("This session cannot use the CUDA Graph feature as requested by the user as all "
                               "compute graph nodes have not been partitioned to the CUDA execution provider.")
        return "session"

    assert ort_cuda.open_session(create, "graph", "plain")[:2] == ("session", False)
    session, on, notes = ort_cuda.open_session(create, "graph", "plain")
    assert notes and notes[0].startswith("CUDA graph off (ONNX Runtime: This session cannot use the CUDA Graph")
    assert ort_cuda.open_session(create, None, "plain") == ("session", False, [])

    def broken(providers):
        raise RuntimeError("Load model failed: protobuf parsing")
    with pytest.raises(RuntimeError, match="protobuf"):
        ort_cuda.open_session(broken, "graph", "plain")


def test_silent_cpu_fallback_is_an_error():
    b = _bare("ort-cuda", {})

    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]
    b.session = Session()
    with pytest.raises(ClipfuseError, match="could not load its CUDAExecutionProvider .* would run on CPUExecutionProvider"):
        b._check_providers_loaded()


def test_output_shapes_from_manifest_symbols():
    manifest = {"inputs": [{"name": "image", "shape": ["batch", 224, 224, 3]},
                           {"name": "class_embeddings", "shape": ["classes", 512]}],
                "outputs": [{"name": "scores", "shape": ["batch", "classes", 14, 14]},
                            {"name": "odd", "shape": ["batch", "unbound"]}]}
    got = ort_cuda.output_shapes(manifest, {"image": (3, 224, 224, 3), "class_embeddings": (7, 512)})
    assert got == {"scores": (3, 7, 14, 14), "odd": None}


def test_cli_and_registry_route_ort_cuda_here():
    from clipfuse.runtime.backends.base import _REGISTRY
    assert _REGISTRY["ort-cuda"][:2] == ("clipfuse.runtime.backends.ort_cuda", "OrtCudaBackend")
    assert _REGISTRY["ort-trt"][:2] == ("clipfuse.runtime.backends.ort_cuda", "OrtCudaBackend")


# --- graphs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_clip):
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    out = tmp_path_factory.mktemp("ortcuda")
    spec = ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none", classes=VOCAB, size=224,
                           templates="single")
    return {"image": export_image_graph(spec, out / "img", clip=tiny_clip),
            "dynamic": export_image_graph(replace(spec, vocab_mode="dynamic"), out / "dyn", clip=tiny_clip),
            "frame": export_image_graph(replace(spec, frame=(240, 320)), out / "frame", clip=tiny_clip)}


def _feeds(kind: str, manifest: dict, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in manifest["inputs"]:
        shape = [batch if d == "batch" else (4 if isinstance(d, str) else d) for d in spec["shape"]]
        if spec["dtype"] == "uint8":
            feeds[spec["name"]] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif spec["dtype"] == "int64":
            feeds[spec["name"]] = np.zeros(shape, np.int64) + np.arange(shape[0])[:, None]
        else:
            x = rng.standard_normal(shape).astype(np.float32)
            feeds[spec["name"]] = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return feeds


class _CpuBound(ort_cuda.OrtCudaBackend):
    """The backend's binding logic with CPU OrtValues on the CPU EP (what a CPU machine can run)."""
    device_type = "cpu"

    def _check_available(self, ort):
        pass

    def _providers(self, options):
        return ["CPUExecutionProvider"]

    def _check_providers_loaded(self):
        pass


@pytest.mark.parametrize("kind", ["image", "dynamic", "frame"])
def test_resident_bindings_match_a_plain_session(graphs, kind):
    path = graphs[kind]
    manifest = read_manifest(path.with_suffix(".json"))
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with _CpuBound(path, manifest, backend="ort-cuda", cuda_graph=True) as backend:
        assert backend.cuda_graph   # the CPU EP accepts the run option; graph ids are still handed out
        seen = []
        for batch, seed in ((2, 0), (1, 1), (2, 2), (3, 3)):
            feeds = _feeds(kind, manifest, batch, seed)
            got = backend.run(feeds)
            want = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, feeds)))
            assert set(got) == set(want)
            for name in want:
                assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
                np.testing.assert_array_equal(got[name], want[name])
            seen.append(backend._staged)
        # one resident slot per shape: the third call (batch 2 again) reused the first's buffers
        assert seen[2] is seen[0] and seen[1] is not seen[0] and len(backend._slots) == 3
        assert sorted(s.graph_id for s in backend._slots.values()) == [0, 1, 2]


def test_shapes_past_the_graph_limit_run_uncached(graphs, monkeypatch):
    monkeypatch.setattr(ort_cuda, "MAX_GRAPHS", 2)
    path = graphs["image"]
    manifest = read_manifest(path.with_suffix(".json"))
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with _CpuBound(path, manifest, backend="ort-cuda", cuda_graph=True) as backend:
        for batch in (1, 2, 3, 4):
            feeds = _feeds("image", manifest, batch, batch)
            np.testing.assert_array_equal(backend.run(feeds)["scores"], plain.run(None, feeds)[0])
        assert len(backend._slots) == 2 and backend._staged.graph_id == -1
    with _CpuBound(path, manifest, backend="ort-cuda") as backend:   # no graphs: oldest buffers freed
        for batch in (1, 2, 3):
            backend.run(_feeds("image", manifest, batch))
        assert [k[0][1][0] for k in backend._slots] == [2, 3]


# --- on a GPU: parity with ONNX Runtime CPU --------------------------------------------------------

def _need_ort_cuda():
    reason = ort_cuda.unavailable_reason("ort-cuda")
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["image", "dynamic", "frame"])
@pytest.mark.parametrize("graph", [False, True])
def test_ort_cuda_matches_ort_cpu(graphs, kind, graph):
    _need_ort_cuda()
    path = graphs[kind]
    manifest = read_manifest(path.with_suffix(".json"))
    with open_backend(path, manifest, "ort-cpu") as cpu, open_backend(path, manifest, "ort-cuda", cuda_graph=graph) as gpu:
        assert gpu.cuda_graph == graph or gpu.notes
        for batch, seed in ((2, 0), (2, 1), (1, 2), (2, 3)):   # repeats replay the captured graph
            feeds = _feeds(kind, manifest, batch, seed)
            want, got = cpu.run(feeds), gpu.run(feeds)
            for name, ref in want.items():
                if ref.dtype.kind in "iu":     # labels: the argmax may flip only at near-ties
                    assert (got[name] == ref).mean() >= 0.999
                else:
                    np.testing.assert_allclose(got[name], ref, atol=2e-3, rtol=0)


@pytest.mark.gpu
def test_ort_cuda_runs_the_fp16_graph(graphs):
    _need_ort_cuda()
    from clipfuse.export.build import BuildOptions, build
    path = graphs["image"]
    manifest = read_manifest(path.with_suffix(".json"))
    fp16 = build(path, manifest, BuildOptions(dry_run=True, trt="rtx", targets=("86",)), log=lambda m: None).fp16_onnx
    fp16_manifest = read_manifest(fp16.with_suffix(".json"))
    feeds = _feeds("image", manifest, 4)
    with open_backend(path, manifest, "ort-cpu") as cpu, open_backend(fp16, fp16_manifest, "ort-cuda", cuda_graph=True) as gpu:
        ref, got = cpu.run(feeds)["scores"], gpu.run(feeds)["scores"]
        again = gpu.run(feeds)["scores"]
    assert got.dtype == np.float32 and np.abs(got - ref).max() <= 1e-2
    np.testing.assert_array_equal(again, got)


@pytest.mark.gpu
def test_ort_cuda_text_and_refer_graphs(tmp_path, tiny_clip):
    _need_ort_cuda()
    from clipfuse.export.refer_export import export_refer
    paths = export_refer(tmp_path / "refer", model="ViT-T-16-test", pretrained="none", seed=0)
    for part, path in paths.items():
        manifest = read_manifest(path.with_suffix(".json"))
        feeds = _feeds(part, manifest, 2)
        if part == "text":
            feeds = {k: np.clip(v, 0, 10) for k, v in feeds.items()}
        with open_backend(path, manifest, "ort-cpu") as cpu, open_backend(path, manifest, "ort-cuda") as gpu:
            want, got = cpu.run(feeds), gpu.run(feeds)
        for name, ref in want.items():
            np.testing.assert_allclose(got[name], ref, atol=2e-3, rtol=0, err_msg=f"{part} {name}")


@pytest.mark.gpu
def test_ort_trt_matches_ort_cpu(graphs):
    reason = ort_cuda.unavailable_reason("ort-trt")
    if reason:
        pytest.skip(reason)
    path = graphs["image"]
    manifest = read_manifest(path.with_suffix(".json"))
    feeds = _feeds("image", manifest, 2)
    with open_backend(path, manifest, "ort-cpu") as cpu, \
            open_backend(path, manifest, "ort-trt", fp16=True, batch_profile=[1, 2, 4]) as gpu:
        assert np.abs(gpu.run(feeds)["scores"] - cpu.run(feeds)["scores"]).max() <= 1e-2
