"""Graph checks: each must FAIL on a small graph built to violate it, and pass on its fixed twin."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from clipfuse.export import graph_checks  # noqa: E402

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _model(nodes, inputs, outputs, inits=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _layernorm_model(dtype):
    x = helper.make_tensor_value_info("x", dtype, [1, 5, 8])
    y = helper.make_tensor_value_info("y", dtype, [1, 5, 8])
    np_dtype = np.float16 if dtype == F16 else np.float32
    inits = [numpy_helper.from_array(np.ones(8, np_dtype), "g"), numpy_helper.from_array(np.zeros(8, np_dtype), "b")]
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, name="ln")
    return _model([node], [x], [y], inits)


def _decomposed_ln_model(dtype):
    np_dtype = np.float16 if dtype == F16 else np.float32
    x = helper.make_tensor_value_info("x", dtype, [1, 5, 8])
    y = helper.make_tensor_value_info("y", dtype, [1, 5, 8])
    inits = [numpy_helper.from_array(np.array(2, np_dtype), "two"),
             numpy_helper.from_array(np.array(1e-5, np_dtype), "eps")]
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], name="mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="sub"),
        helper.make_node("Pow", ["d", "two"], ["d2"], name="pow"),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1], name="var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
        helper.make_node("Div", ["d", "std"], ["y"], name="div"),
    ]
    return _model(nodes, [x], [y], inits)


def test_fp16_layernorm_op_fails_and_fp32_passes():
    bad = graph_checks.no_fp16_layernorm(_layernorm_model(F16))
    assert len(bad) == 1 and "FP16 LayerNorm" in bad[0] and "'ln'" in bad[0]
    assert graph_checks.no_fp16_layernorm(_layernorm_model(F32)) == []


def test_fp16_decomposed_layernorm_fails_and_fp32_passes():
    bad = graph_checks.no_fp16_layernorm(_decomposed_ln_model(F16))
    assert len(bad) == 1 and "decomposed LayerNorm" in bad[0]
    assert graph_checks.no_fp16_layernorm(_decomposed_ln_model(F32)) == []


def test_unsupported_op_fails():
    x = helper.make_tensor_value_info("x", F32, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [4])
    ok = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=TensorProto.INT64)],
                [x], [y])
    assert graph_checks.supported_ops(ok) == []
    # Unique and StringNormalizer-like ops have no TensorRT importer
    bad = _model([helper.make_node("Unique", ["x"], ["u"], name="uniq"),
                  helper.make_node("Cast", ["u"], ["y"], to=TensorProto.INT64)], [x],
                 [helper.make_tensor_value_info("y", TensorProto.INT64, ["n"])])
    msgs = graph_checks.supported_ops(bad)
    assert len(msgs) == 1 and "Unique" in msgs[0] and "'uniq'" in msgs[0]
    custom = _model([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")], [x],
                    [helper.make_tensor_value_info("y", F32, [4])], extra_opsets=["com.microsoft"])
    assert "com.microsoft::FastGelu" in graph_checks.supported_ops(custom)[0]


def _attention_model(scale_on_q: bool):
    q = helper.make_tensor_value_info("q", F32, [1, 2, 5, 4])
    k = helper.make_tensor_value_info("k", F32, [1, 2, 4, 5])
    v = helper.make_tensor_value_info("v", F32, [1, 2, 5, 4])
    o = helper.make_tensor_value_info("o", F32, [1, 2, 5, 4])
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    if scale_on_q:
        nodes = [helper.make_node("Mul", ["q", "scale"], ["qs"]),
                 helper.make_node("MatMul", ["qs", "k"], ["s"]),
                 helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "v"], ["o"])]
    else:
        nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]),
                 helper.make_node("Mul", ["s", "scale"], ["ss"], name="late_scale"),
                 helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "v"], ["o"])]
    return _model(nodes, [q, k, v], [o], [scale])


def test_attention_scale_after_qk_fails_and_scale_on_q_passes():
    msgs = graph_checks.attention_scale_on_q(_attention_model(scale_on_q=False))
    assert len(msgs) == 1 and "late_scale" in msgs[0] and "before the first MatMul" in msgs[0]
    assert graph_checks.attention_scale_on_q(_attention_model(scale_on_q=True)) == []


def _image_model(h, w):
    img = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", h, w, 3])
    out = helper.make_tensor_value_info("scores", F32, ["batch", h, w, 3])
    return _model([helper.make_node("Cast", ["image"], ["scores"], to=F32)], [img], [out])


def test_dynamic_image_hw_fails_and_static_passes():
    msgs = graph_checks.static_image_hw(_image_model("height", 224))
    assert len(msgs) == 1 and "H=height" in msgs[0]
    assert graph_checks.static_image_hw(_image_model(224, 224)) == []


def test_run_checks_collects_every_failure():
    msgs = graph_checks.run_checks(_layernorm_model(F16))
    assert any(m.startswith("[no_fp16_layernorm]") for m in msgs)
    # a graph with two faults gets both messages, each under its check's name
    both = graph_checks.run_checks(_uint8_model(cast_first=False, h="height"))
    assert any(m.startswith("[static_image_hw]") for m in both)
    assert any(m.startswith("[uint8_only_into_cast]") for m in both)


def test_graph_without_an_image_input_skips_the_image_check():
    # the text encoder's only input is tokens [batch, 77]: no H/W to check
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", 77])
    out = helper.make_tensor_value_info("emb", F32, ["batch", 77])
    model = _model([helper.make_node("Cast", ["tokens"], ["emb"], to=F32)], [tokens], [out])
    assert graph_checks.static_image_hw(model) == []


def _uint8_model(cast_first: bool, h=224):
    """image uint8 NHWC -> NCHW float, with the Cast before (TensorRT-legal) or after the Transpose."""
    img = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", h, 224, 3])
    out = helper.make_tensor_value_info("x", F32, ["batch", 3, h, 224])
    if cast_first:
        nodes = [helper.make_node("Cast", ["image"], ["f"], to=F32, name="cast"),
                 helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2], name="nchw")]
    else:
        nodes = [helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2], name="nchw"),
                 helper.make_node("Cast", ["t"], ["x"], to=F32, name="cast")]
    return _model(nodes, [img], [out])


def test_uint8_input_must_go_straight_into_a_cast():
    # the exact class of graph TensorRT's parser rejected ("/trunk/Transpose: first input has type UInt8")
    msgs = graph_checks.uint8_only_into_cast(_uint8_model(cast_first=False))
    assert "'image' feeds Transpose node 'nchw'" in msgs[0]
    assert "computed inside the graph" in msgs[1]  # the transposed UInt8 tensor, cast too late
    assert graph_checks.uint8_only_into_cast(_uint8_model(cast_first=True)) == []
    # a UInt8 tensor made inside the graph and used further is refused too
    x = helper.make_tensor_value_info("x", F32, [4])
    y = helper.make_tensor_value_info("y", F32, [4])
    inner = _model([helper.make_node("Cast", ["x"], ["u"], to=TensorProto.UINT8),
                    helper.make_node("Cast", ["u"], ["y"], to=F32, name="back")], [x], [y])
    msgs = graph_checks.uint8_only_into_cast(inner)
    assert len(msgs) == 1 and "computed inside the graph" in msgs[0]


