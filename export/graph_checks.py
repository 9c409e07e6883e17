"""Checks every graph passes before a TensorRT build (`clipfuse build` refuses a failing graph).

Each check takes an onnx.ModelProto and returns a list of one-line messages (empty = pass):
* supported_ops: only operators TensorRT's ONNX parser documents as supported;
* no_fp16_layernorm: no LayerNormalization, and no decomposed ReduceMean/Sub/Pow/ReduceMean
  LayerNorm, computing in FP16 (the first cause of FP16 overflow in ViTs);
* attention_scale_on_q: in every MatMul -> Softmax -> MatMul chain the 1/sqrt(d) scale is applied
  before the first MatMul (TensorRT fuses the chain into one MHA kernel only then);
* static_image_hw: the image input has fixed H/W (only the batch axis is dynamic);
* uint8_only_into_cast: UInt8 tensors only as graph inputs consumed by Cast nodes and nothing
  else (TensorRT's ONNX parser rejects a UInt8 network input that feeds any other layer, e.g.
  "/trunk/Transpose: first input has type UInt8 but must have type Float, Half, ...").
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import onnx
from onnx import TensorProto

# TensorRT's ONNX parser support matrix (operators.md of the onnx-tensorrt repository, "Operator
# Support Matrix", rows marked Y). Base: the 8.5 table (the first with opset 17); plus the operators the
# 8.6/10.x tables add as supported: LayerNormalization (8.6+, opset 17), GroupNormalization,
# IsInf, BitwiseAnd/Or/Xor/Not, Gelu (opset 20), Bernoulli, BlackmanWindow/HammingWindow/
# HannWindow, CastLike, Col2Im, Mish-free. Only ops clipfuse graphs can contain matter in practice;
# everything else fails the check so an unexpected op is caught on the host, not on the device.
TRT_ONNX_OPS_OPSET17 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
Bernoulli BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Cast CastLike Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear
Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND
Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul
Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare
Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())

_LAYOUT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast"})


def tensor_types(model: onnx.ModelProto) -> Dict[str, int]:
    """Element type of every named tensor (inputs, outputs, inferred values, weights, constants)."""
    from .folding import weightless_skeleton

    # Inference serializes the model it is given: without its weights (declared as typed graph
    # inputs instead) a graph over protobuf's 2 GB limit (external data) still type-checks.
    skeleton, _ = weightless_skeleton(model)
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node -> {node.output[0]!r}"


def supported_ops(model: onnx.ModelProto) -> List[str]:
    domains = {"", "ai.onnx"}
    bad: Dict[str, int] = {}
    first: Dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in domains else f"{node.domain}::{node.op_type}"
        if node.domain not in domains or node.op_type not in TRT_ONNX_OPS_OPSET17:
            bad[key] = bad.get(key, 0) + 1
            first.setdefault(key, node)
    return [f"unsupported op {op} ({n}x, e.g. {_label(first[op])}): not in TensorRT's ONNX "
            "operator support list" for op, n in sorted(bad.items())]


def no_fp16_layernorm(model: onnx.ModelProto) -> List[str]:
    types = tensor_types(model)
    graph = model.graph
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    messages = []
    for node in graph.node:
        if node.op_type == "LayerNormalization" and types.get(node.input[0]) == TensorProto.FLOAT16:
            messages.append(f"FP16 LayerNorm: {_label(node)} computes in FP16 (keep LayerNorm in FP32: "
                            "it overflows in ViTs)")
        if node.op_type != "ReduceMean":
            continue
        # decomposed LN: mean = ReduceMean(x); d = Sub(x, mean); var = ReduceMean(Pow(d, 2) | Mul(d, d))
        x = node.input[0]
        for sub in consumers.get(node.output[0], []):
            if sub.op_type != "Sub" or sub.input[0] != x:
                continue
            for sq in consumers.get(sub.output[0], []):
                is_square = sq.op_type == "Pow" or (sq.op_type == "Mul" and sq.input[0] == sq.input[1])
                if not is_square:
                    continue
                var = [c for c in consumers.get(sq.output[0], []) if c.op_type == "ReduceMean"]
                pattern = [node, sub, sq] + var
                if var and any(types.get(n.input[0]) == TensorProto.FLOAT16 for n in pattern):
                    messages.append(f"FP16 LayerNorm: decomposed LayerNorm at {_label(node)} "
                                    "(ReduceMean/Sub/Pow/ReduceMean) computes in FP16")
    return messages


def attention_scale_on_q(model: onnx.ModelProto) -> List[str]:
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    messages = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        # walk back from the Softmax to the first MatMul, through casts, layout ops and bias Adds
        name, between = softmax.input[0], []
        node = producers.get(name)
        while node is not None and node.op_type != "MatMul":
            if node.op_type in _LAYOUT or node.op_type in ("Add", "Mul", "Div"):
                between.append(node)
                data = [x for x in node.input if x not in constants]
                node = producers.get(data[0]) if data else None
            else:
                node = None
        if node is None:
            continue
        if not any(c.op_type == "MatMul" for c in _through_layout(softmax.output[0], consumers)):
            continue  # a classifier softmax, not attention
        scaled = [n for n in between if n.op_type in ("Mul", "Div")
                  and any(x in constants for x in n.input)]
        if scaled:
            messages.append(f"attention scale after QK^T: {_label(scaled[0])} scales the output of "
                            f"{_label(node)} before Softmax; apply the scale to Q before the first "
                            "MatMul so TensorRT fuses MatMul->Softmax->MatMul")
    return messages


def _through_layout(name: str, consumers) -> List[onnx.NodeProto]:
    out = []
    for c in consumers.get(name, []):
        if c.op_type in _LAYOUT:
            out.extend(_through_layout(c.output[0], consumers))
        else:
            out.append(c)
    return out


def static_image_hw(model: onnx.ModelProto, input_name: Optional[str] = None) -> List[str]:
    inputs = {i.name: i for i in model.graph.input}
    if input_name is None:
        # the image (or refer crops): the first rank-4 input; a text graph has none
        rank4 = [n for n, i in inputs.items() if len(i.type.tensor_type.shape.dim) == 4]
        if "image" not in inputs and not rank4:
            return []
    name = input_name or ("image" if "image" in inputs else rank4[0])
    if name not in inputs:
        return [f"graph has no input named {name!r} (inputs: {', '.join(inputs)})"]
    dims = inputs[name].type.tensor_type.shape.dim
    if len(dims) != 4:
        return [f"input {name!r} has rank {len(dims)}, expected 4 (NHWC uint8 image)"]
    bad = [f"{axis}={d.dim_param or '?'}" for axis, d in zip("HW", dims[1:3]) if not d.dim_value]
    if bad:
        return [f"input {name!r} has dynamic {', '.join(bad)}: H and W must be fixed per engine "
                "(only the batch axis is dynamic); re-export with a fixed --size"]
    return []


def uint8_only_into_cast(model: onnx.ModelProto) -> List[str]:
    graph = model.graph
    types = tensor_types(model)
    inputs = {i.name for i in graph.input}
    messages = []
    for node in graph.node:
        for x in node.input:
            if x and types.get(x) == TensorProto.UINT8:
                if x not in inputs:
                    messages.append(f"UInt8 tensor {x!r} is computed inside the graph and consumed by "
                                    f"{_label(node)}: TensorRT allows UInt8 only as a network input or "
                                    "output going straight through a Cast")
                elif node.op_type != "Cast":
                    messages.append(f"UInt8 input {x!r} feeds {_label(node)}: TensorRT accepts a UInt8 "
                                    "input only when it goes straight into a Cast (cast it first)")
    return messages


CHECKS: Dict[str, Callable[[onnx.ModelProto], List[str]]] = {
    "supported_ops": supported_ops,
    "no_fp16_layernorm": no_fp16_layernorm,
    "attention_scale_on_q": attention_scale_on_q,
    "static_image_hw": static_image_hw,
    "uint8_only_into_cast": uint8_only_into_cast,
}


def run_checks(model: onnx.ModelProto) -> List[str]:
    """All messages of all checks; empty means the graph may be built."""
    messages: List[str] = []
    for name, check in CHECKS.items():
        messages.extend(f"[{name}] {m}" for m in check(model))
    return messages
