"""`clipfuse compare`: comparators on hand-made arrays; the command on a tiny export with the
PyTorch reference, ONNX FP32/FP16 and a backend registered from outside (any runtime backend
plugs in without touching compare)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from clipfuse.runtime.compare import Tolerance, compare_output, compare_outputs
from clipfuse.runtime.cli import main as cli_main

STREET = str(Path(__file__).parent / "data" / "street.jpg")


def test_comparator_verdicts():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    same = compare_output("scores", a, a.copy(), Tolerance(max_abs=0.0))
    assert same.passed and same.max_abs == 0.0 and same.argmax_agreement == 1.0

    small = a + 1e-3
    r = compare_output("scores", a, small, Tolerance(max_abs=1e-4, min_argmax=0.99))
    assert not r.passed and abs(r.max_abs - 1e-3) < 1e-6 and r.argmax_agreement == 1.0
    assert any("max abs diff" in f for f in r.failures)

    # swap the top two classes at one of 18 positions: 17/18 = 94.4 % agreement
    flipped = a.copy()
    top2 = np.argsort(a[0, :, 0, 0])[-2:]
    flipped[0, top2, 0, 0] = a[0, top2[::-1], 0, 0]
    r = compare_output("scores", a, flipped, Tolerance(max_abs=10.0, min_argmax=0.99))
    assert not r.passed and abs(r.argmax_agreement - 17 / 18) < 1e-9 and "argmax agreement" in r.failures[0]
    assert compare_output("scores", a, flipped, Tolerance(max_abs=10.0, min_argmax=0.9)).passed

    nan = a.copy()
    nan[1, 2, 1, 1] = np.nan
    r = compare_output("scores", a, nan, Tolerance(max_abs=1.0))
    assert not r.passed and r.nonfinite_b == 1 and "NaN/Inf" in r.failures[0]
    assert compare_output("scores", a, nan, Tolerance(max_abs=1.0, allow_nonfinite=True)).passed

    r = compare_output("scores", a, a[:1], Tolerance(max_abs=1.0))
    assert not r.passed and "shapes differ" in r.failures[0]
    # per-output tolerances, and an output missing from B
    res = compare_outputs({"scores": a, "aux": a}, {"scores": small}, {"scores": Tolerance(max_abs=1e-2)},
                          Tolerance(max_abs=0.0))
    assert res[0].passed and not res[1].passed and res[1].failures == ["missing from B"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_clip):
    pytest.importorskip("clipfuse.export.api")
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    from clipfuse.export.build import BuildOptions, build
    from clipfuse.runtime.manifest import manifest_path_for, read_manifest

    out = tmp_path_factory.mktemp("cmp")
    path = export_image_graph(ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none",
                                              classes=[["sky"], ["tree"], ["road"],
                              ["car"]], size=224, templates="single"), out / "sclip", clip=tiny_clip)
    build(path, read_manifest(manifest_path_for(path)), BuildOptions(precision="fp16", dry_run=True),
          log=lambda m: None)
    return path


def test_compare_reference_vs_onnx_and_fp32_vs_fp16(exported, capsys):
    fp16 = exported.with_name("sclip.fp16.onnx")
    assert cli_main(["compare", f"{exported}@torch", str(exported), "--images", STREET]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("scores"))
    assert row.endswith("ok") and "100.000%" in row
    assert float(row.split()[2]) <= 1e-4
    # FP16 passes its default tolerance (2e-2) and misses an impossible one: exit 1, one stderr line
    assert cli_main(["compare", str(exported), str(fp16), "--images", STREET]) == 0
    capsys.readouterr()
    assert cli_main(["compare", str(exported), str(fp16), "--images", STREET, "--atol", "scores=1e-9"]) == 1
    captured = capsys.readouterr()
    assert "FAIL: max abs diff" in captured.out
    assert "clipfuse compare: 1 of 1 output(s) outside tolerance" in captured.err


def test_compare_plugs_in_any_registered_backend(exported, capsys, monkeypatch):
    """A backend registered later (e.g. OpenVINO) works in compare without changing it: here one
    that shifts the scores, so the comparison must fail on argmax agreement."""
    from clipfuse.runtime.backends import base, register_backend
    from clipfuse.runtime.backends.onnxruntime import OrtBackend

    # the registry is process-wide: later tests (the generated CLI reference) must not see test-swap
    monkeypatch.setattr(base, "_REGISTRY", dict(base._registry()))

    class SwapBackend(OrtBackend):
        def __init__(self, artifact, manifest, backend="test-swap", **options):
            super().__init__(artifact, manifest, backend="ort-cpu", **options)
            self.name = "test-swap"

        def run(self, feeds):
            out = super().run(feeds)
            return {k: v[:, ::-1].copy() for k, v in out.items()}  # reverse the class axis

    module = types.ModuleType("clipfuse_test_swap_backend")
    module.SwapBackend = SwapBackend
    monkeypatch.setitem(sys.modules, module.__name__, module)
    register_backend("test-swap", module.__name__, "SwapBackend", (".onnx",))
    assert cli_main(["compare", str(exported), f"{exported}@test-swap", "--images", STREET,
                     "--atol", "100", "--json"]) == 1
    import json
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["outputs"][0]["argmax_agreement"] < 0.99


def test_compare_refuses_bad_input(exported, tmp_path, tiny_clip, capsys):
    from clipfuse.export.api import ImageExportSpec, export_image_graph

    other = export_image_graph(ImageExportSpec("naclip", model="ViT-T-16-test", pretrained="none",
                                               classes=[["sky"], ["tree"], ["road"],
                               ["car"]], size=224, templates="single"), tmp_path / "naclip", clip=tiny_clip)
    assert cli_main(["compare", str(exported), str(other), "--images", STREET]) == 2
    assert "different exports" in capsys.readouterr().err
    assert cli_main(["compare", str(exported), str(exported), "--images", str(tmp_path / "none.jpg")]) == 2
    assert "image not found" in capsys.readouterr().err
    assert cli_main(["compare", str(exported), f"{exported}@nope", "--images", STREET]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
