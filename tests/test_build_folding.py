"""Constant folding of every export (export.folding, called by artifacts.graph_with_manifest)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxslim")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from clipfuse.export.folding import fold_file  # noqa: E402
from clipfuse.runtime.errors import ClipfuseError  # noqa: E402


def _shape_arithmetic_model(cast_first: bool = True):
    """image uint8 [batch, 4, 4, 3] -> float, flattened with a reshape whose target shape is computed
    from Shape/Gather/Unsqueeze/Concat, as the TorchScript exporter writes it."""
    img = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 4, 4, 3])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 48])
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([48], np.int64), "n48"),
             numpy_helper.from_array(np.full((1,), 2.0, np.float32), "two")]
    first = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT)] if cast_first else \
        [helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2]),
         helper.make_node("Cast", ["t"], ["f"], to=TensorProto.FLOAT)]
    nodes = first + [
        helper.make_node("Constant", [], ["c2"], value=numpy_helper.from_array(np.array(3.0, np.float32))),
        helper.make_node("Mul", ["two", "c2"], ["six"]),            # constant arithmetic
        helper.make_node("Identity", ["six"], ["six_id"]),
        helper.make_node("Mul", ["f", "six_id"], ["g"]),
        helper.make_node("Shape", ["g"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "zero1"], ["b1"]),
        helper.make_node("Concat", ["b1", "n48"], ["target"], axis=0),
        helper.make_node("Reshape", ["g", "target"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero1"))
    model = helper.make_model(helper.make_graph(nodes, "g", [img], [out], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_folding_shrinks_the_graph_keeps_batch_dynamic_and_outputs_equal(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    model = _shape_arithmetic_model()
    onnx.save(model, str(path))
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    counts = fold_file(path)
    folded = onnx.load(str(path))
    assert counts == {"nodes_before": len(model.graph.node), "nodes_after": len(folded.graph.node)}
    ops = {n.op_type for n in folded.graph.node}
    assert counts["nodes_after"] < counts["nodes_before"] and not ops & {"Constant", "Identity"}
    assert folded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_array_equal(after, before)  # batch 5 runs: the batch axis stayed dynamic
    assert np.array_equal(before * 1.0, x.reshape(5, 48) * 6.0)


def test_folding_refuses_a_tensorrt_illegal_uint8_input(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(_shape_arithmetic_model(cast_first=False), str(path))
    blob = path.read_bytes()
    with pytest.raises(ClipfuseError, match="not TensorRT-legal: UInt8 input 'image' feeds Transpose"):
        fold_file(path)
    assert path.read_bytes() == blob  # left as it was; graph_with_manifest then writes nothing


def test_every_export_is_folded(tmp_path, tiny_clip):
    """The writer all exporters share folds: the manifest records it and the graph has no Constant."""
    pytest.importorskip("clipfuse.export.api")
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    from clipfuse.runtime.manifest import manifest_path_for, read_manifest

    path = export_image_graph(ImageExportSpec("naclip", model="ViT-T-16-test", pretrained="none",
                                              classes=[["a"],
                              ["b"]], size=224, templates="single"), tmp_path / "n", clip=tiny_clip)
    folding = read_manifest(manifest_path_for(path))["folding"]
    model = onnx.load(str(path))
    assert folding["nodes_after"] == len(model.graph.node) and folding["nodes_before"] > 3 * folding["nodes_after"]
    assert not [n for n in model.graph.node if n.op_type in ("Constant", "Identity")]
    assert model.graph.node[0].op_type == "Cast" and model.graph.node[0].input[0] == "image"
