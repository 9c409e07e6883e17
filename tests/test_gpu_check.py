"""The GPU acceptance script end to end on this machine: every GPU step present in the JSON and
Markdown, run or "skipped: <why>" (on a CPU machine: why each backend is absent)."""
from __future__ import annotations

import json
import sys

import pytest

from clipfuse.benchmarks import gpu_check


def test_gpu_check_on_a_machine_without_gpu_backends(tmp_path, capsys):
    backends = gpu_check.gpu_backends()
    if any(rec["available"] for rec in backends.values()):
        pytest.skip("a GPU backend is available here: run the real check, "
                    "python -m clipfuse.benchmarks.gpu_check -o DIR (minutes)")
    out = tmp_path / "check"
    assert gpu_check.main(["-o", str(out), "--budget", "120"]) == 0
    doc = json.loads((out / "gpu-check.json").read_text())
    md = (out / "gpu-check.md").read_text()
    # machine and versions recorded
    assert doc["machine"]["python"] and doc["machine"]["logical_cpus"]
    assert doc["versions"]["clipfuse"] and doc["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(doc["backends"]) == {"tensorrt:tensorrt", "tensorrt:rtx", "ort-cuda", "ort-trt", "torch"}
    steps = {s["step"]: s for s in doc["steps"]}
    assert steps["doctor"]["status"] == "ok" and steps["doctor"]["seconds"] > 0
    expected = {"gpu tests", "export", "bench model"} | {f"compare {n}" for n in backends} \
        | {f"bench e2e frame graph {n}" for n in backends if n != "torch"}
    assert expected <= set(steps)
    for name in expected:
        assert steps[name]["status"] == "skipped" and steps[name]["reason"], name
        assert f"| {name} | skipped: {steps[name]['reason'].replace('|', '/')} |" in md
    for name, rec in backends.items():
        assert steps[f"compare {name}"]["reason"] == rec["reason"]
        assert f"| {name} | no | {rec['reason']} |" in md
    if doc["gpu"] is None:
        assert steps["gpu tests"]["reason"] == "no CUDA GPU visible (cuda-python / nvidia-smi)"
    assert not (out / "work").exists()   # nothing exported without a backend to run it
    assert "wrote" in capsys.readouterr().err


def test_gpu_check_refuses_a_missing_photo(tmp_path, capsys):
    assert gpu_check.main(["-o", str(tmp_path / "c"), "--photo", str(tmp_path / "none.jpg")]) == 2
    assert "test photo not found" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_targets_from_a_model_benchmark(tmp_path):
    def rec(backend, batch, p50):
        return {"backend": backend, "batch": batch, "status": "ok", "latency": {"p50_s": p50}}
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps({"results": [rec("torch-ref", 1, 0.0102), rec("ort-cuda-fp16-graph", 1, 0.003),
                                             rec("tensorrt-fp16-graph", 1, 0.004), rec("torch-compile-fp16", 32, 0.008),
                                             rec("ort-cuda-fp16-graph", 32, 0.0085)]}))
    t = gpu_check.targets(bench)
    assert t["b1_speedup_vs_reference"] == {"backend": "ort-cuda-fp16-graph", "value": 3.4, "target": ">= 3", "met": True}
    assert t["b32_vs_torch_compile_fp16"]["met"] is False and t["b32_vs_torch_compile_fp16"]["value"] == 0.94
    assert gpu_check.targets(tmp_path / "missing.json") is None
