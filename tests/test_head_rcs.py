"""RCS (NACLIP + ResCLIP's residual cross-correlation self-attention): fused module, ONNX graph and
FP16 graph against the independent reference (export/reference.py, hooks on the unmodified tower).

The tiny test ViT has 3 blocks, so its taps are blocks 0 and 1 (ViT-B/16: 5..8). Perturbed biases
and LayerNorm gains make tau visible (out_proj's bias does not scale with it) and smooth images give
structured attention; lambda 0.4 and tau 2.0 as in the spec's table.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from clipfuse.export import fp16 as fp16_pass
from clipfuse.export.api import build_fused, export_image_graph
from clipfuse.export.reference import ReferenceModel
from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import get_method

from conftest import VOCAB
from parity_inputs import match_reference, smooth_images

TOL = 1e-4
TINY_PARAMS = {"attention_blocks": (0, 1), "lam": 0.4}


@pytest.fixture(scope="module")
def rcs(perturbed_tiny, tmp_path_factory):
    spec = perturbed_tiny.spec("rcs", classes=VOCAB, size=224, templates="single", head_params=TINY_PARAMS)
    build = build_fused(spec, clip=perturbed_tiny.clip)
    onnx_path = export_image_graph(spec, tmp_path_factory.mktemp("rcs"), clip=perturbed_tiny.clip)
    return build, onnx_path


def _ort(path, images):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["scores"], {"image": images})[0]


def test_fused_and_onnx_match_reference(rcs):
    build, onnx_path = rcs
    expected, got = match_reference(build, onnx_path, smooth_images(3, 224, seed=11), TOL)
    assert np.isfinite(expected).all() and len(np.unique(expected.argmax(axis=1))) > 1
    assert got.shape == (3, len(VOCAB), 14, 14)


@pytest.mark.parametrize("change", [{"lam": 0.0}, {"tau": 1.0}, {"attention_blocks": (0,)}, {"gaussian_sigma": None}])
def test_reference_sees_every_parameter(rcs, change):
    """Each of lambda, tau and the tapped blocks moves the scores far beyond the tolerance, so the
    parity above cannot pass with one of them dropped."""
    build, _ = rcs
    images = smooth_images(1, 224, seed=5)
    base = ReferenceModel.from_build(build)(images)
    params = dict(build.head_params, **change)
    other = ReferenceModel(build.clip, "rcs", params, build.vocabulary, build.name_embeddings, 224,
                           get_method("rcs").pos_rule)(images)
    assert np.abs(other - base).max() > 100 * TOL


def test_graph_taps_attention_inside_the_same_graph(rcs):
    """One graph, image in and scores out: the taps' Softmax nodes are in it (2 tapped + 1 RCS)."""
    _, onnx_path = rcs
    model = onnx.load(str(onnx_path))
    assert [i.name for i in model.graph.input] == ["image"]
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 3


def test_fp16_graph_agrees_with_fp32(rcs, tmp_path):
    _, onnx_path = rcs
    dst = tmp_path / "rcs.fp16.onnx"
    fp16_pass.convert_file(onnx_path, dst)
    model = onnx.load(str(dst))
    softmax_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    assert softmax_inputs and all(types.get(name, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
                                  for name in softmax_inputs)
    images = smooth_images(4, 224, seed=21)
    fp32, half = _ort(onnx_path, images), _ort(dst, images)
    agree = float((fp32.argmax(1) == half.argmax(1)).mean())
    assert agree >= 0.99, agree


def test_default_taps_need_twelve_blocks(perturbed_tiny):
    spec = perturbed_tiny.spec("rcs", classes=VOCAB, size=224, templates="single")
    with pytest.raises(ClipfuseError, match="attention blocks"):
        build_fused(spec, clip=perturbed_tiny.clip)


def test_spec_table():
    spec = get_method("rcs")
    assert spec.head_params["tau"] == 2.0 and spec.head_params["attention_blocks"] == (5, 6, 7, 8)
    assert {d: p["lam"] for d, p in spec.dataset_head_params.items()} == {
        "voc21": 0.3, "context60": 0.3, "coco-object": 0.4, "voc20": 0.6, "context59": 0.4,
        "coco-stuff164k": 0.4, "cityscapes": 0.2, "ade20k": 0.3}
    assert spec.protocol_for("voc21").prob_thd == 0.1 and spec.protocol_for("cityscapes").short_side == 560


def test_eval_warns_when_the_baked_lambda_is_not_the_datasets():
    from clipfuse.runtime.eval.runner import head_params_warning
    manifest = {"head": {"name": "rcs", "params": {"lam": 0.3, "tau": 2.0}}}
    assert head_params_warning("rcs", "voc21", manifest) is None
    warning = head_params_warning("rcs", "voc20", manifest)
    assert "lam=0.3" in warning and "lam=0.6" in warning and "--rcs-lambda 0.6" in warning
    assert head_params_warning("naclip", "voc20", {"head": {"name": "naclip", "params": {}}}) is None


def test_export_cli_bakes_rcs_lambda_and_blocks(tmp_path, perturbed_tiny, capsys):
    import json

    from clipfuse.runtime.cli import main
    common = ["export", "--head", "rcs", "--model", perturbed_tiny.model, "--pretrained",
              perturbed_tiny.pretrained, "--classes", "cat;dog", "--templates", "single", "--size", "224",
              "--quick-gelu", "off", "--rcs-lambda", "0.6"]
    # the tiny ViT has no block 5..8: one clear line, exit 2, nothing written
    assert main(common + ["-o", str(tmp_path / "bad")]) == 2
    assert "attention blocks" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))
    assert main(common + ["--rcs-blocks", "0,1", "-o", str(tmp_path / "g")]) == 0
    manifest = json.loads((tmp_path / "g.json").read_text())
    assert manifest["head"]["params"]["lam"] == 0.6
    assert manifest["head"]["params"]["attention_blocks"] == [0, 1]


def test_without_gaussian_bias_still_matches_reference(perturbed_tiny):
    """--gaussian-sigma 0 (None): RCS on a plain kk^T attention; fused == reference."""
    spec = perturbed_tiny.spec("rcs", classes=VOCAB, size=224, templates="single",
                               head_params=dict(TINY_PARAMS, gaussian_sigma=None))
    build = build_fused(spec, clip=perturbed_tiny.clip)
    images = smooth_images(1, 224, seed=3)
    with torch.no_grad():
        fused = build.module(torch.from_numpy(images)).numpy()
    assert np.abs(fused - ReferenceModel.from_build(build)(images)).max() <= TOL
