"""export-text: the ONNX text encoder against open_clip's encode_text (ONNX Runtime CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from clipfuse.export.text_graph import export_text_graph  # noqa: E402
from clipfuse.runtime.cli import main as cli_main  # noqa: E402
from clipfuse.runtime.fileio import sha256_file  # noqa: E402
from clipfuse.runtime.tokenizer import tokenize  # noqa: E402

TEXTS = ["", "a photo of a cat.", "a photo of many kitty.", "itap of my dog.", "grass",
         "naïve café 日本 😀 &amp; 3.14", "word " * 120]


def _session(path):
    # ORT 1.32's CPU NchwcTransformer crashes on the FP16 text graph (see runtime/text.py)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                disabled_optimizers=["NchwcTransformer"])


def _run(path, tokens):
    return _session(path).run(["text_features"], {"tokens": tokens})[0]


def _reference(clip, tokens):
    with torch.no_grad():
        return clip.model.encode_text(torch.from_numpy(tokens)).numpy()


@pytest.fixture(scope="module")
def tiny_graphs(tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    return {p: export_text_graph(out / f"tiny-text-{p}", precision=p, clip=tiny_clip) for p in ("fp32", "fp16")}


@pytest.mark.parametrize("batch", [1, 7])
def test_fp32_graph_equals_encode_text(tiny_clip, tiny_graphs, batch):
    tokens = tokenize(TEXTS[:batch])
    got, ref = _run(tiny_graphs["fp32"], tokens), _reference(tiny_clip, tokens)
    assert got.shape == (batch, 64) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


def test_eot_pooling_follows_the_tokens(tiny_clip, tiny_graphs):
    # the same prefix with EOT at different positions must give different features (argmax pooling is
    # computed in the graph, not baked from the export example)
    tokens = tokenize(["a photo of a", "a photo of a cat on a mat"])
    got = _run(tiny_graphs["fp32"], tokens)
    assert np.abs(got[0] - got[1]).max() > 1e-3
    np.testing.assert_allclose(got, _reference(tiny_clip, tokens), atol=1e-4, rtol=0)


def test_manifest(tiny_graphs):
    path = tiny_graphs["fp32"]
    man = json.loads(path.with_suffix(".json").read_text())
    assert man["kind"] == "text" and man["tokenizer"] == "clip-bpe-49408"
    assert (man["model"], man["pretrained"], man["seed"], man["quick_gelu"]) == ("ViT-T-16-test", "none", 0, False)
    assert man["context_length"] == 77 and man["embed_dim"] == 64 and man["precision"] == "fp32"
    assert man["inputs"][0] == {**man["inputs"][0], "name": "tokens", "dtype": "int64", "shape": ["batch", 77]}
    assert man["outputs"][0]["name"] == "text_features" and man["outputs"][0]["shape"] == ["batch", 64]
    assert man["onnx_sha256"] == sha256_file(path) and man["onnx_file"] == path.name
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == ["tokens"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_fp16_graph_close_to_fp32(tiny_graphs):
    tokens = tokenize(TEXTS)
    f32, f16 = _run(tiny_graphs["fp32"], tokens), _run(tiny_graphs["fp16"], tokens)
    assert f16.dtype == np.float32 and np.isfinite(f16).all()
    cos = (f32 * f16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(f16, axis=1)
    assert cos.min() > 0.999, cos


def test_fp16_graph_precision_islands(tiny_graphs):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_graphs["fp16"])))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert sum(t.data_type == F16 for t in g.initializer) >= 10  # the weights really are FP16
    for node in g.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.input[0]] == F32, node.name
    final = next(n for n in g.node if "text_features" in n.output)
    assert final.op_type == "MatMul" and all(types[x] == F32 for x in final.input)
    man = json.loads(tiny_graphs["fp16"].with_suffix(".json").read_text())
    assert man["precision"] == "fp16" and man["fp16"]["fp32_extra"] == ["text_projection"]


def test_cli_export_text_rebuilds_the_seeded_weights(tiny_clip, tmp_path, capsys):
    prefix = tmp_path / "cli" / "t-text"
    assert cli_main(["export-text", "--model", "ViT-T-16-test", "--pretrained", "none", "-o", str(prefix), "-q"]) == 0
    tokens = tokenize(TEXTS[:3])
    # a fresh load with seed 0 inside the command gives the fixture's weights
    np.testing.assert_allclose(_run(prefix.with_suffix(".onnx"), tokens), _reference(tiny_clip, tokens),
                               atol=1e-4, rtol=0)
    assert prefix.with_suffix(".json").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["export-text", "--model", "ViT-Q-99", "--pretrained", "none", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines: one error line
    assert err.startswith("clipfuse export-text: error: unknown model 'ViT-Q-99'")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
def test_vitb16_fp32_graph_equals_encode_text(vitb16_clip, tmp_path):
    path = export_text_graph(tmp_path / "b16-text", clip=vitb16_clip)
    tokens = tokenize(TEXTS)
    got, ref = _run(path, tokens), _reference(vitb16_clip, tokens)
    assert got.shape == (len(TEXTS), 512)
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
