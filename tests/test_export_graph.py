"""What the exported graph and its manifest promise: I/O contract, hash, opset, the attention
pattern TensorRT fuses, in-graph synonyms and the dynamic vocabulary."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from clipfuse.export.api import ImageExportSpec, build_fused, export_image_graph
from clipfuse.export.reference import ReferenceModel
from clipfuse.runtime.methods import METHODS
from clipfuse.runtime.fileio import sha256_file
from clipfuse.runtime.manifest import read_manifest

from conftest import PLAIN_VOCAB, TINY, VOCAB
from parity_inputs import smooth_images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "sclip-tiny"
    path = export_image_graph(ImageExportSpec("sclip", model=TINY, pretrained="none", classes=VOCAB, size=224,
                                              templates="single"), out)
    return path, read_manifest(path.with_suffix(".json"))


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_manifest_describes_the_graph(exported):
    path, manifest = exported
    assert manifest["onnx_sha256"] == sha256_file(path)
    assert manifest["kind"] == "image" and manifest["opset"] == 17 and manifest["precision"] == "fp32"
    assert manifest["classes"] == VOCAB and manifest["grid"] == [14, 14] and manifest["input_size"] == [224, 224]
    assert manifest["head"]["params"] == {"attn": "qq+kk", "gaussian_sigma": None, "residual": True, "ffn": True}
    assert manifest["protocol"]["short_side"] == 336 and manifest["protocol"]["stride"] == 112
    assert manifest["protocol"]["score_type"] == "cosine" and manifest["protocol"]["logit_scale"] == 40.0
    assert manifest["pretrained"] == "none" and manifest["seed"] == 0

    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 224, 224, 3]
    assert out.name == "scores" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 4, 14, 14]
    assert [s["name"] for s in manifest["inputs"]] == ["image"]
    assert manifest["outputs"][0]["shape"] == ["batch", 4, 14, 14]


def test_batch_axis_is_dynamic(exported):
    path, _ = exported
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    together = _run(path, {"image": batch})
    alone = _run(path, {"image": batch[1:2]})
    assert together.shape[0] == 3
    assert np.abs(together[1:2] - alone).max() < 1e-5


def _producer(model):
    return {out: node for node in model.graph.node for out in node.output}


def test_attention_scale_is_on_q_before_first_matmul(exported):
    """Every Softmax reads MatMul(Mul(x, scale), y) (+ bias): the pattern TensorRT fuses into MHA."""
    path, _ = exported
    model = onnx.load(str(path))
    producer = _producer(model)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    # 2 trunk blocks (vanilla) + the SCLIP block (qq and kk)
    assert len(softmaxes) == 4
    for node in softmaxes:
        matmul = producer[node.input[0]]
        assert matmul.op_type == "MatMul", matmul.op_type
        assert producer[matmul.input[0]].op_type == "Mul"


def test_synonyms_take_the_max_over_names(tmp_path, tiny_clip):
    """Class 'cat, kitty' scores as the max of the two names' cosine logits."""
    build = build_fused(ImageExportSpec("maskclip", model=TINY, pretrained="none", classes=VOCAB, size=224,
                                        templates="single"), clip=tiny_clip)
    flat = build_fused(ImageExportSpec("maskclip", model=TINY, pretrained="none",
                                       classes=[[n] for names in VOCAB for n in names], size=224,
                                       templates="single"), clip=tiny_clip)
    images = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        grouped, per_name = build.module(images), flat.module(images)
    # names: background, cat, kitty, dog, grass
    assert torch.equal(grouped[:, 1], torch.maximum(per_name[:, 1], per_name[:, 2]))
    assert torch.equal(grouped[:, 2], per_name[:, 3])
    assert not torch.equal(per_name[:, 1], per_name[:, 2])


def test_dynamic_vocab_equals_baked(tmp_path, perturbed_tiny):
    spec = perturbed_tiny.spec("naclip", classes=PLAIN_VOCAB, size=224, templates="single")
    baked = export_image_graph(spec, tmp_path / "baked", clip=perturbed_tiny.clip)
    dynamic = export_image_graph(replace(spec, vocab_mode="dynamic"), tmp_path / "dyn", clip=perturbed_tiny.clip)
    manifest = read_manifest(dynamic.with_suffix(".json"))
    assert [s["name"] for s in manifest["inputs"]] == ["image", "class_embeddings"]
    assert manifest["outputs"][0]["shape"] == ["batch", "classes", 14, 14]
    build = build_fused(spec, clip=perturbed_tiny.clip)
    emb = build.name_embeddings.numpy()
    images = smooth_images(2, 224, seed=1)
    want = _run(baked, {"image": images})
    got = _run(dynamic, {"image": images, "class_embeddings": emb})
    assert np.abs(got - want).max() <= 1e-5
    # K is dynamic: two rows in, two classes out, equal to the same rows of the baked graph
    two = _run(dynamic, {"image": images, "class_embeddings": emb[[3, 1]]})
    assert two.shape == (2, 2, 14, 14)
    assert np.abs(two - want[:, [3, 1]]).max() <= 1e-5


def test_dinoiser_background_rule_only_with_background_class(tmp_path, perturbed_tiny):
    spec = perturbed_tiny.spec("clip-dinoiser", classes=PLAIN_VOCAB, size=224, templates="single")
    with_bg = build_fused(spec, clip=perturbed_tiny.clip)
    no_bg = build_fused(replace(spec, classes=PLAIN_VOCAB[1:]), clip=perturbed_tiny.clip)
    assert ReferenceModel.from_build(with_bg).background_rule is True
    assert ReferenceModel.from_build(no_bg).background_rule is False
    images = torch.from_numpy(smooth_images(1, 224, seed=5))
    with torch.no_grad():
        probs = with_bg.module(images)
    # the rule sets background to exactly 1 somewhere (random heads: about half the patches)
    assert (probs[:, 0] == 1.0).any()
    # without a background class the graph must not force class 0, and still equals the reference
    with torch.no_grad():
        probs_no_bg = no_bg.module(images)
    assert not (probs_no_bg[:, 0] == 1.0).any()
    assert no_bg.head_params["background_rule"] is False
    assert torch.allclose(probs_no_bg.sum(dim=1), torch.ones(1, 14, 14), atol=1e-5)
    assert np.abs(probs_no_bg.numpy() - ReferenceModel.from_build(no_bg)(images.numpy())).max() <= 1e-4
    manifest_path = export_image_graph(spec, tmp_path / "d", clip=perturbed_tiny.clip)
    manifest = json.loads(manifest_path.with_suffix(".json").read_text())
    assert manifest["protocol"]["background_rule"] is True
    assert manifest["protocol"]["score_type"] == "probability"


def test_export_spec_round_trips_through_the_manifest(exported):
    """The reference and the torch backend rebuild from the manifest: the spec they get must be the
    one the graph was exported from (defaults resolved), not a near copy."""
    _, manifest = exported
    spec = ImageExportSpec("sclip", model=TINY, pretrained="none", classes=VOCAB, size=224, templates="single")
    rebuilt = ImageExportSpec.from_manifest(manifest)
    # what the build decided (the preset, QuickGELU from the weights) is recorded, not guessed again
    assert rebuilt == replace(spec.resolved(), head_params=rebuilt.head_params, quick_gelu=manifest["quick_gelu"],
                              allow_duplicates=True)
    assert rebuilt.head_params == {"attn": "qq+kk", "gaussian_sigma": None, "residual": True, "ffn": True}
    assert {k: manifest[k] for k in rebuilt.to_manifest() if k != "head"} == {
        k: v for k, v in rebuilt.to_manifest().items() if k != "head"}
    assert manifest["protocol"]["window"] == manifest["input_size"][0]


def test_one_source_for_the_window():
    for method in METHODS.values():
        assert method.default_size == method.protocol.window
        assert method.protocol_at(method.default_size) == method.protocol
        other = method.protocol_at(336)
        assert (other.window, other.stride, other.short_side) == (336, 168, max(method.protocol.short_side, 336))
