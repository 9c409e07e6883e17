"""`clipfuse doctor`: never crashes, reports real versions, JSON mode, capability logic."""
from __future__ import annotations

import json
import platform
import sys

import pytest

from clipfuse.runtime import doctor
from clipfuse.runtime.cli import main as cli_main


def test_doctor_json_reports_installed_versions(capsys):
    assert cli_main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    versions = report["versions"]
    import numpy
    assert versions["numpy"] == numpy.__version__
    assert versions["python"] == platform.python_version()
    for key in ("torch", "open_clip", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "polygraphy", "cuda-python"):
        assert key in versions
    try:
        import onnxruntime
        assert report["onnxruntime_providers"] == onnxruntime.get_available_providers()
        assert report["can"]["run_ort_cpu"] is True
    except ImportError:
        assert report["can"]["run_ort_cpu"] is False
    mem = report["host_memory"]
    assert mem["total_bytes"] is None or mem["total_bytes"] >= (mem["available_bytes"] or 0) > 0
    assert set(report["can"]) == {"export", "build_fp16_onnx", "build_engines_tensorrt", "build_engines_rtx",
                                  "run_ort_cpu", "run_ort_cuda", "run_ort_trt", "run_engines_tensorrt",
                                  "run_engines_rtx"}
    if report["gpu"] is None:
        assert not report["can"]["build_engines_tensorrt"] and not report["can"]["run_engines_tensorrt"]
        assert not report["can"]["run_engines_rtx"]
    # TensorRT for RTX builds ahead of time without a GPU: doctor says so exactly when it imports
    try:
        import polygraphy  # noqa: F401
        import tensorrt_rtx
        assert versions["tensorrt_rtx"] == tensorrt_rtx.__version__ and report["can"]["build_engines_rtx"]
        assert "86" in report["rtx_targets"]
    except ImportError:
        assert not report["can"]["build_engines_rtx"]


def test_doctor_text_mode(capsys):
    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "what clipfuse can do here:" in out and "GPU:" in out and "onnxruntime providers:" in out


def test_doctor_survives_missing_and_broken_packages(monkeypatch, capsys):
    # every optional package gone or raising on import: doctor still reports
    for name in ("torch", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx", "cuda", "cuda.bindings", "open_clip"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(doctor, "_dist_version", lambda dist: None)
    monkeypatch.setattr(doctor.shutil, "which", lambda exe: None)
    report = doctor.collect()
    assert report["versions"]["tensorrt"] is None and report["gpu"] is None
    assert report["onnxruntime_providers"] == []
    assert not any(report["can"].values())
    text = doctor.format_report(report)
    assert "not installed" in text and "[ no] run TensorRT engines" in text


def test_capabilities_with_a_gpu():
    gpu = doctor.GpuInfo(name="Orin", sm="87", total_bytes=8 << 30, free_bytes=6 << 30, driver="CUDA 12.6")
    versions = {"torch": None, "open_clip": None, "onnx": "1.16", "onnxruntime": "1.18",
                "tensorrt": "10.3.0.30", "tensorrt_rtx": None, "polygraphy": "0.53.6", "cuda-python": "12.6.0"}
    can = doctor.capabilities(versions, ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                         "CPUExecutionProvider"], gpu)
    assert can == {"export": False, "build_fp16_onnx": True, "build_engines_tensorrt": True,
                   "build_engines_rtx": False, "run_ort_cpu": True, "run_ort_cuda": True, "run_ort_trt": True,
                   "run_engines_tensorrt": True, "run_engines_rtx": False}
    assert not doctor.capabilities(versions, ["CPUExecutionProvider"], None)["run_engines_tensorrt"]
    # RTX: builds without a GPU; runs only on a GPU that is one of its targets (Hopper is not)
    rtx = dict(versions, tensorrt=None, tensorrt_rtx="1.7.1.116")
    targets = ["75", "80", "86", "89", "120", "121"]
    assert doctor.capabilities(rtx, [], None, targets)["build_engines_rtx"]
    assert doctor.capabilities(rtx, [], doctor.GpuInfo(name="RTX 4090", sm="89"), targets)["run_engines_rtx"]
    assert not doctor.capabilities(rtx, [], doctor.GpuInfo(name="H100", sm="90"), targets)["run_engines_rtx"]


def test_nvidia_smi_parsing(monkeypatch):
    class Done:
        returncode = 0
        stdout = "NVIDIA H100 80GB HBM3, 9.0, 81559, 80000, 550.54.15\n"

    monkeypatch.setattr(doctor.shutil, "which", lambda exe: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(doctor.subprocess, "run", lambda *a, **k: Done())
    info = doctor._gpu_via_nvidia_smi(0)
    assert info.name == "NVIDIA H100 80GB HBM3" and info.sm == "90"
    assert info.total_bytes == 81559 << 20 and info.free_bytes == 80000 << 20
    assert doctor._gpu_via_nvidia_smi(1) is None


@pytest.mark.gpu
def test_gpu_probe_on_a_gpu_machine():
    info = doctor.gpu_info()
    if info is None:
        pytest.skip("no CUDA GPU visible here (cuda-python / nvidia-smi)")
    assert info.sm.isdigit() and info.total_bytes >= info.free_bytes > 0
