"""Fused module and exported ONNX (ONNX Runtime CPU) against the independent PyTorch reference.

Tolerance: max |diff| of scores <= 1e-4 in FP32, for every head; tiny ViT at 224 and 448, full
ViT-B/16 (random weights) at 224 and 448.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipfuse.export.api import ImageExportSpec, build_fused, export_image_graph
from clipfuse.export.reference import ReferenceModel

from conftest import TINY, TINY_HEAD_PARAMS, VOCAB, registry_heads
from parity_inputs import match_reference, smooth_images

from clipfuse.runtime.methods import METHODS

TOL = 1e-4


def _images(n: int, size: int, seed: int) -> np.ndarray:
    # smooth images: random noise alone makes every patch alike
    return smooth_images(n, size, seed)


def _check_scores_informative(scores: np.ndarray, argmax_varies: bool = True) -> None:
    """Guard against a vacuous pass: the scores must vary across classes and positions."""
    assert np.isfinite(scores).all()
    assert scores.std(axis=(2, 3)).mean() > 1e-4
    if argmax_varies:
        assert len(np.unique(scores.argmax(axis=1))) > 1


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("head", registry_heads())
def test_tiny_fused_and_onnx_match_reference(tmp_path, perturbed_tiny, head, size):
    """Biases and LayerNorm gains perturbed (random init would hide a dropped bias)."""
    spec = perturbed_tiny.spec(head, classes=VOCAB, size=size, templates="single",
                               head_params=TINY_HEAD_PARAMS.get(head, {}))
    build = build_fused(spec, clip=perturbed_tiny.clip)
    onnx_path = export_image_graph(spec, tmp_path / head, clip=perturbed_tiny.clip)
    expected, got = match_reference(build, onnx_path, _images(2, size, seed=size), TOL)
    _check_scores_informative(expected)
    assert got.shape == (2, len(VOCAB), size // 16, size // 16)


def test_reference_rebuilds_from_manifest(tmp_path):
    """A manifest alone (seeded random weights) reproduces the graph through the reference."""
    import json

    import onnxruntime as ort

    onnx_path = export_image_graph(ImageExportSpec("sclip", model=TINY, pretrained="none", classes=VOCAB, size=224,
                                                   templates="single", seed=3), tmp_path / "m")
    manifest = json.loads(onnx_path.with_suffix(".json").read_text())
    ref = ReferenceModel.from_manifest(manifest)
    images = _images(1, 224, seed=1)
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    assert np.abs(got - ref(images)).max() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 448])
def test_vitb16_every_head_onnx_matches_reference(tmp_path, vitb16_clip, size):
    """Full-size ViT-B/16: export every head at the window its protocol uses (224 or 448; weights
    loaded once) and run it on ONNX Runtime. Both sizes and both positional-table rules are covered
    at full size; every head at both sizes is the tiny-tower test above (a full-size export at the
    other size took ~2 more minutes of CI for no path the two sets do not already take)."""
    import onnxruntime as ort

    from clipfuse.export.api import _onnx_export

    images = _images(1, size, seed=7)
    worst = {}
    heads = [head for head, method in METHODS.items() if method.protocol.window == size]
    assert heads and all(m.protocol.window in (224, 448) for m in METHODS.values()), "a head left out"
    for head in heads:
        build = build_fused(ImageExportSpec(head, model="ViT-B-16", pretrained="none", classes=VOCAB, size=size,
                                            templates="single"), clip=vitb16_clip)
        expected = ReferenceModel.from_build(build)(images)
        # On unperturbed random ViT-B/16 weights SC-CLIP's pooled features pick one class everywhere
        # (scores still vary, std ~2e-3); its label parity runs on perturbed weights in
        # tests/test_head_scclip.py.
        _check_scores_informative(expected, argmax_varies=head != "sc-clip")
        path = tmp_path / f"{head}.onnx"
        with torch.no_grad():
            _onnx_export(build.module, (torch.from_numpy(images),), path, ["image"],
                         {"image": {0: "batch"}, "scores": {0: "batch"}}, 17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        got = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
        worst[head] = float(np.abs(got - expected).max())
        path.unlink()
    assert max(worst.values()) <= TOL, worst


@pytest.fixture(scope="module")
def vitl14_perturbed_clip():
    """ViT-L/14 seeded random weights, biases and LayerNorm gains perturbed in memory (1.7 GB
    of FP32 weights; no copy on disk)."""
    from parity_inputs import perturb_

    from clipfuse.export.weights import load_clip
    clip = load_clip("ViT-L-14", "none", seed=0)
    perturb_(clip.model, seed=1)
    return clip


@pytest.mark.slow
@pytest.mark.parametrize("head", ["naclip"])
def test_vitl14_onnx_matches_reference(tmp_path, vitl14_perturbed_clip, head):
    """Full-size ViT-L/14 (patch 14, 24 blocks, width 1024; 224 -> 16x16 grid): the exported graph
    (folded, as `clipfuse export` writes it) against the independent reference on perturbed
    random weights. One head, NACLIP (attention and FFN surgery in the last block): SCLIP too
    passed (1e-4) but added ~1.5 min to CI for a path the tiny patch-14 tower covers for every head
    (tests/test_backbones.py); add heads here to check them at full size."""
    spec = ImageExportSpec(head, model="ViT-L-14", pretrained="none", classes=VOCAB, size=224, templates="single")
    build = build_fused(spec, clip=vitl14_perturbed_clip)
    onnx_path = export_image_graph(spec, tmp_path / head, clip=vitl14_perturbed_clip)
    expected, got = match_reference(build, onnx_path, _images(1, 224, seed=11), TOL)
    _check_scores_informative(expected)
    assert got.shape == (1, len(VOCAB), 16, 16)
