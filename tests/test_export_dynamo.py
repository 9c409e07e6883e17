"""`clipfuse export --exporter dynamo` (torch.export + onnxscript, weights written as external data
without in-memory copies): every head's graph equals the independent reference on the perturbed
tiny tower at the legacy graphs' tolerance, at a batch size other than the traced one, passes
the export's TensorRT-legality check, and opens in the runtime; bad combinations are one line.
The peak-memory effect is measured by benchmarks/export_memory.py (docs/backbones.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipfuse.export.api import build_fused, export_image_graph
from clipfuse.runtime.cli import main

from conftest import TINY, TINY_HEAD_PARAMS, VOCAB, registry_heads
from parity_inputs import match_reference, smooth_images

TOL = 1e-4          # as tests/test_export_parity.py


@pytest.mark.parametrize("head", registry_heads())
def test_tiny_dynamo_graph_matches_reference(tmp_path, perturbed_tiny, head):
    pytest.importorskip("onnxscript", reason="--exporter dynamo needs onnxscript (pip install onnxscript)")
    from clipfuse.runtime import Segmenter

    spec = perturbed_tiny.spec(head, classes=VOCAB, size=224, templates="single", exporter="dynamo", opset=18,
                               head_params=TINY_HEAD_PARAMS.get(head, {}))
    build = build_fused(spec, clip=perturbed_tiny.clip)
    onnx_path = export_image_graph(spec, tmp_path / head, clip=perturbed_tiny.clip)
    images = smooth_images(3, 224, seed=11)          # the export traced batch 2: the batch is symbolic
    expected, got = match_reference(build, onnx_path, images, TOL)
    assert len(np.unique(expected.argmax(axis=1))) > 1
    manifest = json.loads(onnx_path.with_suffix(".json").read_text())
    assert manifest["opset"] == 18 and not onnx_path.with_name(onnx_path.name + ".data").exists()
    with Segmenter.open(onnx_path) as seg:
        assert seg.segment(images[0]).labels.shape == (224, 224)


@pytest.mark.parametrize("extra, message", [
    (["--opset", "17"], "--exporter dynamo writes opset >= 18, not 17"),
    (["--exporter", "torchscript"], "argument --exporter: invalid choice: 'torchscript' (choose from 'legacy', "
                                    "'dynamo') (see `clipfuse export --help`)"),
    (["--frame", "320x240"], "--exporter dynamo exports window graphs; frame graphs use the legacy exporter"),
])
def test_dynamo_bad_combinations_are_one_line(tmp_path, capsys, extra, message):
    code = main(["export", "--head", "naclip", "--model", TINY, "--pretrained", "none", "--classes", "a,b",
                 "--templates", "single", "--exporter", "dynamo", *extra, "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"clipfuse export: error: {message}\n", err
    assert list(tmp_path.iterdir()) == []
