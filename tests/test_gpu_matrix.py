"""The flavour x GPU table (clipfuse.runtime.trt_support) and everything that reads it, on a CPU
machine with a simulated GPU: trt_support.device_sm is the one function that reports the device's
compute capability, so replacing it makes build, the TensorRT backend, `run`, doctor and bench
behave as on that GPU. The H200 measurement behind the table: TensorRT for RTX 1.7 builds for
SM 90 but refuses the engine at deserialize."""
from __future__ import annotations

import json

import pytest

from clipfuse.runtime import doctor, trt_support
from clipfuse.runtime.cli import main as cli_main
from clipfuse.runtime.errors import ClipfuseError

onnx = pytest.importorskip("onnx")


def _simulate(monkeypatch, sm, name="simulated GPU"):
    monkeypatch.setattr(trt_support, "device_sm", lambda device=0: sm)
    info = None if sm is None else doctor.GpuInfo(name=name, sm=sm, total_bytes=1 << 34, free_bytes=1 << 34,
                                                  driver="simulated", source="test")
    monkeypatch.setattr(doctor, "gpu_info", lambda device=0: info)


def _have_rtx() -> bool:
    return trt_support.probe("rtx") is not None


@pytest.mark.parametrize("sm, rtx, tensorrt", [
    ("80", True, True), ("86", True, True), ("89", True, True), ("120", True, True), ("121", True, True),
    ("75", True, True),            # Turing: an opt-in RTX target
    ("90", False, True),           # Hopper (H100/H200): measured refusal by TensorRT for RTX 1.7
    ("87", False, True),           # Jetson Orin
    ("110", False, True),          # Jetson Thor
    ("100", False, True),          # data-centre Blackwell
])
def test_matrix(sm, rtx, tensorrt):
    assert trt_support.runs_on("rtx", sm) is rtx
    assert trt_support.runs_on("tensorrt", sm) is tensorrt
    assert trt_support.serving_flavours(sm) == [k for k, ok in (("tensorrt", tensorrt), ("rtx", rtx)) if ok]
    assert (trt_support.cannot_run_reason("rtx", sm) is None) is rtx


def test_refusal_line_names_every_fix():
    line = trt_support.cannot_run_reason("rtx", "90")
    assert line.startswith("TensorRT for RTX engines do not run on this GPU, SM 90 (Hopper: H100, H200")
    for fix in ("install TensorRT", "clipfuse build --trt tensorrt", "--backend ort-cuda"):
        assert fix in line
    assert "\n" not in line
    # an SM newer than the table: enterprise TensorRT is assumed to serve it, RTX only if it lists it
    assert trt_support.runs_on("tensorrt", "130")
    assert not trt_support.runs_on("rtx", "130")


def test_auto_flavour_choice_per_gpu(monkeypatch):
    monkeypatch.setattr(trt_support, "available", lambda: ["rtx"])
    monkeypatch.setattr(trt_support, "probe", lambda key: "1.7.1.116" if key == "rtx" else None)
    assert trt_support.choose_for_device("auto", "86") == "rtx"
    with pytest.raises(ClipfuseError, match=r"TensorRT for RTX cannot build engines that run on this GPU, SM 90.*"
                                            r"install TensorRT.*--trt tensorrt.*--backend ort-cuda.*--allow-foreign-gpu"):
        trt_support.choose_for_device("auto", "90")
    assert trt_support.choose_for_device("auto", "90", allow_foreign_gpu=True) == "rtx"
    with pytest.raises(ClipfuseError, match="TensorRT for RTX engines do not run on this GPU, SM 87"):
        trt_support.choose_for_device("rtx", "87")
    assert trt_support.choose_for_device("rtx", None) == "rtx"   # no GPU: ahead-of-time builds are the point
    # both installed: auto takes enterprise TensorRT on Hopper and on an RTX GPU alike
    monkeypatch.setattr(trt_support, "available", lambda: ["tensorrt", "rtx"])
    assert trt_support.choose_for_device("auto", "90") == "tensorrt"
    monkeypatch.setattr(trt_support, "available", lambda: [])
    with pytest.raises(ClipfuseError, match="no TensorRT here"):
        trt_support.choose_for_device("auto", "90")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    api = pytest.importorskip("clipfuse.export.api")
    out = tmp_path_factory.mktemp("matrix") / "maskclip"
    spec = api.ImageExportSpec("maskclip", model="ViT-T-16-test", pretrained="none",
                               classes=[["sky"], ["road"]], size=224, templates="single")
    return api.export_image_graph(spec, out)


def test_build_refuses_an_engine_this_gpu_cannot_run(exported, monkeypatch, capsys):
    if not _have_rtx():
        pytest.skip("tensorrt_rtx does not import: install tensorrt-rtx-cu13")
    _simulate(monkeypatch, "90", "NVIDIA H200")
    for flavour in ("rtx", "auto"):
        assert cli_main(["build", str(exported), "--precision", "fp32", "--trt", flavour]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "SM 90 (Hopper" in err, err
        assert "--trt tensorrt" in err and "--backend ort-cuda" in err and "--allow-foreign-gpu" in err
    # an RTX target that leaves out this (RTX) GPU is refused too
    _simulate(monkeypatch, "89")
    assert cli_main(["build", str(exported), "--precision", "fp32", "--trt", "rtx", "--target-sm", "86"]) == 2
    assert "add --target-sm 89" in capsys.readouterr().err
    # TensorRT for RTX cannot even target SM 90: the message says what serves it
    assert cli_main(["build", str(exported), "--precision", "fp32", "--trt", "rtx", "--target-sm", "90"]) == 2
    assert "needs enterprise TensorRT" in capsys.readouterr().err
    assert not list(exported.parent.glob("*.engine"))


def test_foreign_engine_is_written_on_request_and_run_names_the_fix(exported, monkeypatch, capsys, tmp_path):
    if not _have_rtx():
        pytest.skip("tensorrt_rtx does not import: install tensorrt-rtx-cu13")
    pytest.importorskip("polygraphy", reason="polygraphy is not installed (dev extra): no engine builds")
    _simulate(monkeypatch, "90", "NVIDIA H200")
    assert cli_main(["build", str(exported), "--precision", "fp32", "--trt", "rtx", "--target-sm", "86",
                     "--batch", "1:1:2", "--allow-foreign-gpu"]) == 0
    (engine,) = exported.parent.glob("maskclip.rtx*-sm86-fp32-b1_1_2-*.engine")
    capsys.readouterr()
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
    # run / compare open the engine through the TensorRT backend: one line, the fix, exit 2
    for argv in (["run", str(engine), str(image), "-o", str(tmp_path / "out")],
                 ["compare", str(exported), str(engine), "--images", str(image)]):
        assert cli_main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]   # compare logs progress too
        assert len(err) == 1 and "TensorRT for RTX engines do not run on this GPU, SM 90" in err[0], err
        assert "--backend ort-cuda" in err[0] and "clipfuse build --trt tensorrt" in err[0]
    # on one of its targets the table lets it through (execution itself then needs the real GPU)
    from clipfuse.runtime.backends.tensorrt import check_engine_target
    manifest = json.loads(engine.with_suffix(".json").read_text())
    check_engine_target(manifest, "rtx", manifest["engine"]["tensorrt_version"], "86", engine)


def test_doctor_says_which_flavour_serves_this_gpu(monkeypatch):
    _simulate(monkeypatch, "90", "NVIDIA H200")
    report = doctor.collect()
    here = report["engines_for_this_gpu"]
    assert here["sm"] == "90" and here["flavours"] == ["tensorrt"]
    assert {row["sm"]: (row["tensorrt"], row["rtx"]) for row in report["support_matrix"]}["90"] == (True, False)
    text = doctor.format_report(report)
    assert "engines for this GPU (SM 90 (Hopper: H100, H200, GH200)): TensorRT" in text
    if report["versions"]["tensorrt_rtx"]:
        assert not report["can"]["run_engines_rtx"]
        assert any(n.startswith("TensorRT for RTX engines do not run on this GPU, SM 90") for n in report["notes"])
    _simulate(monkeypatch, "86")
    report = doctor.collect()
    assert report["engines_for_this_gpu"]["flavours"] == ["tensorrt", "rtx"]
    assert not any("do not run on this GPU" in n for n in report["notes"])


def test_bench_skips_engines_with_the_reason_instead_of_building_them(exported, monkeypatch, tmp_path):
    pytest.importorskip("torch")
    from clipfuse.benchmarks import backends as bb
    monkeypatch.setattr(trt_support, "available", lambda: ["rtx"])
    _simulate(monkeypatch, "90", "NVIDIA H200")
    ctx = bb.BenchContext(build=None, onnx_path=exported, manifest={}, workdir=tmp_path, threads=1,
                          torch_device="cuda", max_batch=4)
    with pytest.raises(bb.Unavailable, match=r"SM 90 \(Hopper.*--backend ort-cuda"):
        bb.open_runner("tensorrt-fp16", ctx)
    assert not list(tmp_path.glob("*.engine"))
    _simulate(monkeypatch, None)
    with pytest.raises(bb.Unavailable, match="no CUDA GPU visible"):
        bb.open_runner("tensorrt-fp16-graph", ctx)


def _engine_manifest(flavour: str, version: str, sm: str) -> dict:
    return {"kind": "image", "precision": "fp16",
            "engine": {"flavour": flavour, "tensorrt_version": version, "targets": [sm], "gpu_name": "simulated"}}


def test_tensorrt_backend_checks_the_target_before_tensorrt_is_touched(monkeypatch, tmp_path):
    """TensorRTBackend's first step (_check_target) refuses with one line; deserialize and
    allocate never run (the engine file is not even read)."""
    from clipfuse.runtime.backends.tensorrt import TensorRTBackend
    engine = tmp_path / "m.engine"          # never read: every case is refused before
    imported = []
    monkeypatch.setattr(trt_support, "import_trt", lambda key: imported.append(key))
    _simulate(monkeypatch, None)
    with pytest.raises(ClipfuseError, match="no CUDA GPU visible"):
        TensorRTBackend(engine, _engine_manifest("tensorrt", "10.13.0", "90"))
    _simulate(monkeypatch, "90", "NVIDIA H200")
    with pytest.raises(ClipfuseError, match=r"m.engine: TensorRT for RTX engines do not run on this GPU, SM 90"):
        TensorRTBackend(engine, _engine_manifest("rtx", "1.7.1", "90"))
    assert imported == []


def test_tensorrt_backend_refuses_another_release_before_deserializing(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from clipfuse.runtime.backends.tensorrt import TensorRTBackend
    calls = []
    fake_trt = SimpleNamespace(__version__="10.13.0", Runtime=lambda logger: calls.append("Runtime"))
    fake_cudart = SimpleNamespace(cudaSetDevice=lambda device: calls.append("cudaSetDevice") or (0,))
    monkeypatch.setattr(trt_support, "import_trt", lambda key: fake_trt)
    monkeypatch.setattr(trt_support, "import_cudart", lambda: fake_cudart)
    _simulate(monkeypatch, "90", "NVIDIA H200")
    with pytest.raises(ClipfuseError, match=r"m.engine was built with TensorRT 11.0.0, this machine has 10.13.0"):
        TensorRTBackend(tmp_path / "m.engine", _engine_manifest("tensorrt", "11.0.0", "90"))
    with pytest.raises(ClipfuseError, match=r"built for GPU SM 89 .*this GPU is SM 90"):
        TensorRTBackend(tmp_path / "m.engine", _engine_manifest("tensorrt", "10.13.1", "89"))
    assert calls == []          # no device made current, no runtime created
