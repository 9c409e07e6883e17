"""Lean export: the streamed single-file writer (export/onnxio.write_proto_streamed) writes the
bytes SerializeToString writes, so graphs, hashes and engine names are unchanged by it."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from clipfuse.export import onnxio

from conftest import PLAIN_VOCAB


@pytest.fixture(scope="module")
def exported(tmp_path_factory, perturbed_tiny):
    from clipfuse.export.api import export_image_graph
    spec = perturbed_tiny.spec("naclip", classes=PLAIN_VOCAB, size=224, templates="single")
    return export_image_graph(spec, tmp_path_factory.mktemp("lean") / "naclip", clip=perturbed_tiny.clip)


def test_exported_graph_file_is_what_serialize_writes(exported):
    model = onnx.load(str(exported))
    assert exported.read_bytes() == model.SerializeToString()


def test_streamed_writer_matches_serialize_to_string(exported, tmp_path):
    model = onnx.load(str(exported))
    out = tmp_path / "streamed.onnx"
    onnxio.write_proto_streamed(model, out)
    assert out.read_bytes() == model.SerializeToString()


def test_streamed_writer_on_every_field_kind(tmp_path):
    """Fields before and after the graph and the initializers (metadata, functions, doc strings,
    value_info, sparse initializers, an empty graph name), large varint lengths."""
    big = helper.make_tensor("w", TensorProto.FLOAT, [300, 300], [0.5] * 90000)        # length > 2 varint bytes
    small = helper.make_tensor("b", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    sparse = helper.make_sparse_tensor(helper.make_tensor("sv", TensorProto.FLOAT, [1], [1.0]),
                                       helper.make_tensor("si", TensorProto.INT64, [1], [0]), [4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])], initializer=[big, small],
        doc_string="graph doc", value_info=[helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
        sparse_initializer=[sparse])
    func = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                                [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[func], doc_string="model doc", producer_name="p")
    helper.set_model_props(model, {"k": "v"})
    out = tmp_path / "m.onnx"
    onnxio.write_proto_streamed(model, out)
    assert out.read_bytes() == model.SerializeToString()
    onnxio.write_proto_streamed(onnx.ModelProto(), out)                   # no graph at all
    assert out.read_bytes() == onnx.ModelProto().SerializeToString()


def test_fp16_shape_inference_without_weights_equals_whole_model(exported, monkeypatch):
    """convert_to_fp16 infers shapes on a copy without the big weights; inference on the whole
    converted model (what it did before) must give the same graph, byte for byte."""
    from clipfuse.export import folding
    from clipfuse.export.fp16 import convert_to_fp16

    monkeypatch.setattr(folding, "DETACH_MIN_BYTES", 1024)     # the tiny tower's weights are small
    fp16, _ = convert_to_fp16(onnx.load(str(exported)))
    assert len(folding.weightless_skeleton(fp16)[1]) > 10      # weights really were left out
    whole = onnx.ModelProto()
    whole.CopyFrom(fp16)
    del whole.graph.value_info[:]
    whole = onnx.shape_inference.infer_shapes(whole, strict_mode=True)
    assert whole.SerializeToString() == fp16.SerializeToString()
