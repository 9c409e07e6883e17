"""FP32 ONNX -> FP16 ONNX with FP32 islands and explicit Casts (precision decided in the graph).

TensorRT 11 dropped the weak-typed FP16 builder flag: an engine is built strongly typed from a
graph whose tensors already carry their precision. This pass makes that graph:

* every float tensor is FP16, except the islands that overflow or lose accuracy in FP16:
  LayerNormalization (and its decomposed ReduceMean/Sub/Pow/Sqrt/Div form), Softmax, every
  reduction (L2 norms, pooling sums, statistics) and the elementwise ops that consume a reduction
  (x / ||x||, x - mean, var + eps), the MatMul whose sums are divided by such a statistic
  (CLIP-DINOiser's guided pooling, the projection feeding an L2 norm), and everything downstream of
  the cosine classifier (the MatMul of L2-normalised features with the class embeddings: synonym
  max, softmax, background rule);
* every node in the scope of a head submodule named `fp32_*` (declared islands: SC-CLIP's
  outlier selection and similarity thresholds);
* graph inputs and outputs keep their dtypes (uint8 image in, float32 scores out);
* a Cast sits at every boundary between the two, so TensorRT, ONNX Runtime and a reader of the
  graph all see the same precision decisions.

Why our own pass: onnxconverter-common 1.16 (float16.convert_float_to_float16) was tried on these
graphs: with any op_block_list it crashes (AttributeError in remove_unnecessary_cast_node), it
clamps small constants such as LayerNorm's eps to 1e-7, and its block list works per op TYPE while
the islands here are patterns of ordinary Div/Mul/Sub/MatMul nodes (blocking Div or MatMul by type
keeps half the network in FP32). ModelOpt AutoCast picks islands from activation ranges of
calibration data and its [onnx] extra pulls onnxruntime-gpu. This pass is deterministic,
dependency-free, and clipfuse.export.graph_checks re-checks its result on every build.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from clipfuse.runtime.errors import ClipfuseError

from .graph_checks import tensor_types

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16

# Always computed in FP32 (overflow or accuracy: statistics, exp-normalisations).
FP32_OPS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax", "LpNormalization", "MeanVarianceNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceL1", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMin", "ReduceProd",
    "Pow", "Sqrt", "Reciprocal",
    # float inputs that are not data (scales, ranges) must stay float32 by the ONNX spec
    "Resize", "Upsample", "Range", "ConstantOfShape",
})
REDUCE_OPS = frozenset(op for op in FP32_OPS if op.startswith("Reduce"))
# Ops that carry a statistic (mean, norm, variance) unchanged in size class, e.g. norm.clamp(eps).
STAT_CARRIERS = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Clip", "Max", "Min",
                           "Expand", "Pow", "Abs", "Neg", "Identity", "Cast", "Unsqueeze",
                           "Reshape", "Transpose", "Squeeze"})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Clip", "Max", "Min", "Expand", "Where"})
SUM_REDUCE_OPS = frozenset({"ReduceSum", "ReduceL2", "ReduceSumSquare", "ReduceL1"})
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten"})
MATMUL_OPS = frozenset({"MatMul", "Gemm"})
# Prefix of a module attribute whose whole scope stays FP32 (export/heads/scclip.py).
DECLARED_FP32_SCOPE = "fp32_"
MOVE_OPS = LAYOUT_OPS | {"Slice", "Gather", "Concat", "Split", "Expand", "Tile"}


@dataclass
class Fp16Report:
    """What the pass did, for the manifest and the build log."""

    nodes: int = 0
    fp32_nodes: int = 0
    casts_inserted: int = 0
    initializers_fp16: int = 0
    fp32_by_reason: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"tool": "clipfuse.export.fp16", "nodes": self.nodes, "fp32_nodes": self.fp32_nodes,
                "casts_inserted": self.casts_inserted, "initializers_fp16": self.initializers_fp16,
                "fp32_by_reason": dict(sorted(self.fp32_by_reason.items()))}


def _consumers(graph: onnx.GraphProto) -> Dict[str, List[int]]:
    out: Dict[str, List[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                out.setdefault(name, []).append(i)
    return out


def _producers(graph: onnx.GraphProto) -> Dict[str, int]:
    return {name: i for i, node in enumerate(graph.node) for name in node.output if name}


def _constant_names(graph: onnx.GraphProto) -> Set[str]:
    names = {init.name for init in graph.initializer}
    for node in graph.node:  # topological: Identity/Cast of a constant is a constant
        if node.op_type == "Constant" or (node.op_type in ("Identity", "Cast") and node.input[0] in names):
            names.add(node.output[0])
    return names


def fp32_islands(model: onnx.ModelProto, extra_fp32_ops: Iterable[str] = ()) -> Dict[int, str]:
    """Node index -> reason, for every node that must compute in FP32.

    The rules are structural (no calibration data), so the same graph always gives the same islands.
    """
    graph = model.graph
    nodes = graph.node
    consumers, producers = _consumers(graph), _producers(graph)
    constants = _constant_names(graph)
    fp32_ops = FP32_OPS | frozenset(extra_fp32_ops)
    islands: Dict[int, str] = {}

    # 1. op types that are always FP32
    for i, node in enumerate(nodes):
        if node.op_type in fp32_ops:
            islands[i] = node.op_type

    # 1b. scopes a head declares FP32 by naming its submodule `fp32_*` (SC-CLIP's distances, LOF,
    #     TopK thresholds, cosine matrices and S >= beta masks: discontinuous in their inputs, so
    #     no structural rule below would be enough)
    for i, node in enumerate(nodes):
        if any(part.startswith(DECLARED_FP32_SCOPE) for part in node.name.split("/")):
            islands.setdefault(i, "declared")

    # 2. statistic tensors: outputs of reductions, carried through elementwise ops whose other
    #    inputs are constants or statistics (mean + eps, sqrt(var), clamp(norm, eps), expand(norm)).
    #    `sum_stats` are the sum-based ones (L2 norms, pooling denominators), not means/variances.
    stats: Set[str] = set()
    sum_stats: Set[str] = set()
    for node in nodes:  # graph order is topological
        if node.op_type in REDUCE_OPS:
            stats.update(node.output)
            if node.op_type in SUM_REDUCE_OPS:
                sum_stats.update(node.output)
        elif node.op_type in STAT_CARRIERS:
            data = [x for x in node.input if x and x not in constants]
            if node.op_type in LAYOUT_OPS | {"Expand", "Cast"}:
                data = data[:1]  # shape/axes inputs may be computed tensors
            if data and all(x in stats for x in data):
                stats.update(node.output)
                if any(x in sum_stats for x in data):
                    sum_stats.update(node.output)

    # 3. elementwise ops that combine a statistic with data: x - mean, x / std, x / ||x||, x * rsqrt
    normalisers: Set[int] = set()
    l2_normalised: Set[str] = set()
    for i, node in enumerate(nodes):
        if node.op_type in ELEMENTWISE | STAT_CARRIERS and any(x in stats for x in node.input):
            islands.setdefault(i, "statistic")
            divisor = node.input[1] if len(node.input) > 1 else ""
            if node.op_type in ("Div", "Mul") and divisor in stats and node.input[0] not in stats:
                normalisers.add(i)
                if divisor in sum_stats:
                    l2_normalised.update(node.output)

    # 3b. the affine tail of a decomposed LayerNorm ((x - mean) / std * gamma + beta) joins its
    #     island, as it does inside a LayerNormalization op (ONNX Runtime's LayerNormFusion also
    #     mis-types a fusion split by a Cast there).
    for i in sorted(normalisers):
        if nodes[i].input[1] in sum_stats:
            continue
        tail, expect = nodes[i].output[0], ["Mul", "Add"]
        for op in expect:
            users = consumers.get(tail, [])
            if len(users) != 1 or nodes[users[0]].op_type != op \
                    or not any(x in constants for x in nodes[users[0]].input):
                break
            islands.setdefault(users[0], "statistic")
            tail = nodes[users[0]].output[0]

    # 4. a MatMul whose sums are divided by a statistic: pooling sums (CLIP-DINOiser), and the
    #    projection whose output is L2-normalised. Look through layout ops.
    for i in normalisers:
        src = _source(nodes[i].input[0], producers, nodes)
        if src is not None and nodes[src].op_type in MATMUL_OPS | {"Conv"}:
            islands.setdefault(src, "pooling-sum" if nodes[src].op_type != "Conv" else "normalised-projection")

    # 5. cosine MatMuls: L2-normalised features against class embeddings (a constant or the
    #    `class_embeddings` input) or against other L2-normalised features (CLIP-DINOiser's patch
    #    correlation). They and everything downstream (pooling, synonym max, softmax, background
    #    rule) stay FP32.
    graph_inputs = {x.name for x in graph.input}
    for i, node in enumerate(nodes):
        if node.op_type == "Conv" and _source_name(node.input[0], producers, nodes) in l2_normalised:
            # a learned head on L2-normalised features (CLIP-DINOiser's background logit): its
            # sign is thresholded downstream, so it and its consumers stay FP32
            _mark_downstream(i, nodes, consumers, islands)
            continue
        if node.op_type not in MATMUL_OPS | {"Einsum"}:
            continue
        kinds = []
        for x in node.input[:2]:
            src_name = _source_name(x, producers, nodes)
            if src_name in l2_normalised:
                kinds.append("l2")
            elif src_name in constants or src_name in graph_inputs:
                kinds.append("const")
            else:
                kinds.append("data")
        if "l2" in kinds and "data" not in kinds:
            _mark_downstream(i, nodes, consumers, islands)

    # 6. data-movement ops compute nothing: when everything they feed is FP32, they stay FP32 too
    #    (no FP16 round trip between an FP32 producer and an FP32 consumer, e.g. CLIP-DINOiser's
    #    block-9 features reshaped into the correlation head). Reverse order handles chains.
    outputs = {o.name for o in graph.output}
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if i in islands or node.op_type not in MOVE_OPS:
            continue
        users = [u for o in node.output for u in consumers.get(o, [])]
        if users and all(u in islands for u in users) and not any(o in outputs for o in node.output):
            islands[i] = "follows-consumer"
    return islands


def _source_name(name: str, producers: Dict[str, int], nodes) -> str:
    """Follow layout-only ops (reshape, transpose, cast) back to the tensor that holds the values."""
    while name in producers and nodes[producers[name]].op_type in LAYOUT_OPS | {"Cast"}:
        name = nodes[producers[name]].input[0]
    return name


def _source(name: str, producers: Dict[str, int], nodes) -> Optional[int]:
    return producers.get(_source_name(name, producers, nodes))


def _mark_downstream(start: int, nodes, consumers, islands: Dict[int, str]) -> None:
    todo = [start]
    while todo:
        i = todo.pop()
        if islands.get(i) == "classifier":
            continue
        islands[i] = "classifier"
        for out in nodes[i].output:
            todo.extend(consumers.get(out, ()))


def _drop_constant_identities(graph: onnx.GraphProto) -> None:
    """torch.onnx shares weights through Identity nodes; read the initializer directly instead, so
    each consumer gets the constant in its own precision (a Cast on a weight confuses fusions)."""
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        node.input[:] = [alias.get(x, x) for x in node.input]
    del graph.node[:]
    graph.node.extend(kept)


def _check_flat(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ClipfuseError(f"node {node.name or node.op_type} has a subgraph ({node.op_type}); "
                                "the FP16 pass handles flat graphs only")


def _convert_initializers(graph: onnx.GraphProto, islands: Dict[int, str], consumers: Dict[str, List[int]],
                          report: Fp16Report) -> Dict[str, str]:
    """Constants: FP16 when every consumer is an FP16 node, otherwise kept FP32 (+ an FP16 copy).

    Returns {FP32 constant name: its FP16 copy's name} for the constants that need both.
    """
    io_names = {x.name for x in graph.input} | {x.name for x in graph.output}
    fp16_copies: Dict[str, str] = {}
    new_inits: List[onnx.TensorProto] = []
    for init in graph.initializer:
        name = init.name
        if init.data_type != FLOAT or name in io_names:
            continue
        users = consumers.get(name, [])
        users16 = [u for u in users if u not in islands]
        if users and len(users16) == len(users):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name))
            report.initializers_fp16 += 1
        elif users16:
            copy_name = f"{name}__fp16"
            new_inits.append(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), copy_name))
            fp16_copies[name] = copy_name
            report.initializers_fp16 += 1
    graph.initializer.extend(new_inits)
    return fp16_copies


class _NodeRewriter:
    """Walks the nodes in order, tracking the precision of every float tensor as the new graph
    computes it, and inserting one Cast per (tensor, precision) where a node needs the other one."""

    def __init__(self, graph: onnx.GraphProto, types: Dict[str, int], islands: Dict[int, str],
                 consumers: Dict[str, List[int]], fp16_copies: Dict[str, str], report: Fp16Report) -> None:
        self.types, self.islands, self.consumers = types, islands, consumers
        self.fp16_copies, self.report = fp16_copies, report
        self.precision: Dict[str, int] = {x.name: x.type.tensor_type.elem_type for x in graph.input}
        for init in graph.initializer:      # after _convert_initializers: FP16 copies included
            self.precision[init.name] = init.data_type
        self.new_nodes: List[onnx.NodeProto] = []
        self.casts: Dict[tuple, str] = {}

    def cast_to(self, name: str, to: int) -> str:
        key = (name, to)
        if key not in self.casts:
            suffix = "fp16" if to == FLOAT16 else "fp32"
            out = f"{name}__{suffix}"
            self.new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"cast_{suffix}/{name}"))
            self.precision[out] = to
            self.casts[key] = out
            self.report.casts_inserted += 1
        return self.casts[key]

    def _constant(self, node: onnx.NodeProto) -> None:
        users = self.consumers.get(node.output[0], [])
        attr = next((a for a in node.attribute if a.name == "value"), None)
        if (attr is not None and attr.t.data_type == FLOAT and users
                and all(u not in self.islands for u in users)):
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        self.new_nodes.append(node)
        if attr is not None:
            self.precision[node.output[0]] = attr.t.data_type

    def rewrite(self, index: int, node: onnx.NodeProto) -> None:
        if node.op_type == "Constant":
            self._constant(node)
            return
        target = FLOAT if index in self.islands else FLOAT16
        for k, name in enumerate(node.input):
            cur = self.precision.get(name, self.types.get(name))
            if not name or cur not in (FLOAT, FLOAT16) or cur == target:
                continue
            if target == FLOAT16 and name in self.fp16_copies:
                node.input[k] = self.fp16_copies[name]
            else:
                node.input[k] = self.cast_to(name, target)
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i in (FLOAT, FLOAT16):
                to.i = target
        self.new_nodes.append(node)
        for out in node.output:
            t = self.types.get(out)
            if t in (FLOAT, FLOAT16):
                self.precision[out] = target
            elif node.op_type == "Cast":
                self.precision[out] = next(a.i for a in node.attribute if a.name == "to")
            elif t is not None:
                self.precision[out] = t

    def cast_outputs_back(self, graph: onnx.GraphProto) -> None:
        """Outputs keep their declared dtype: rename the producer's tensor, cast back to the output name."""
        renames: Dict[str, str] = {}
        for out in graph.output:
            want = out.type.tensor_type.elem_type
            if self.precision.get(out.name) == want or want not in (FLOAT, FLOAT16):
                continue
            renames[out.name] = f"{out.name}__{'fp16' if self.precision.get(out.name) == FLOAT16 else 'fp32'}"
        if not renames:
            return
        for node in self.new_nodes:
            node.output[:] = [renames.get(o, o) for o in node.output]
            node.input[:] = [renames.get(x, x) for x in node.input]
        for orig, inner in renames.items():
            self.new_nodes.append(helper.make_node("Cast", [inner], [orig], to=FLOAT, name=f"cast_out/{orig}"))
            self.report.casts_inserted += 1


def _install_nodes(model: onnx.ModelProto, new_nodes: List[onnx.NodeProto]) -> onnx.ModelProto:
    """Replace the graph's nodes, drop unused constants, re-infer and check the shapes and types."""
    graph = model.graph
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    used = {x for n in new_nodes for x in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Inference and checker on a copy without the big weights (declared as graph inputs there, with
    # their types and shapes): on the whole model each serialises and re-parses every weight, about
    # 4x the FP32 graph at the conversion's peak. Weights only contribute their shapes; the small
    # constants that shape arithmetic reads stay in the copy. What inference adds comes back.
    from .folding import weightless_skeleton
    skeleton, _ = weightless_skeleton(model)
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=True)
    del skeleton
    onnx.checker.check_model(inferred)
    graph.value_info.extend(inferred.graph.value_info)
    del graph.output[:]
    graph.output.extend(inferred.graph.output)
    return model


def convert_to_fp16(model: onnx.ModelProto, extra_fp32_ops: Iterable[str] = (), *,
                    inplace: bool = False) -> "tuple[onnx.ModelProto, Fp16Report]":
    """Return (FP16 model with FP32 islands, report). The input model is not modified, unless
    `inplace` (a caller that discards it: no second copy of every FP32 weight)."""
    _check_flat(model)
    if not inplace:
        src, model = model, onnx.ModelProto()
        model.CopyFrom(src)
    _drop_constant_identities(model.graph)
    types = tensor_types(model)
    islands = fp32_islands(model, extra_fp32_ops)
    graph = model.graph
    old_nodes = list(graph.node)
    report = Fp16Report(nodes=len(old_nodes), fp32_nodes=len(islands))
    for reason in islands.values():
        report.fp32_by_reason[reason] = report.fp32_by_reason.get(reason, 0) + 1

    consumers = _consumers(graph)
    fp16_copies = _convert_initializers(graph, islands, consumers, report)
    rewriter = _NodeRewriter(graph, types, islands, consumers, fp16_copies, report)
    for i, node in enumerate(old_nodes):
        rewriter.rewrite(i, node)
    rewriter.cast_outputs_back(graph)
    return _install_nodes(model, rewriter.new_nodes), report


def convert_file(src: "str | Path", dst: "str | Path", extra_fp32_ops: Iterable[str] = (),
                 manifest: Optional[dict] = None) -> Fp16Report:
    """FP32 ONNX file -> FP16 ONNX file, written atomically (with its data file when it still needs
    one, export.onnxio; an FP16 graph that fits is one file). With `manifest`, its contract is
    stored in the FP16 graph (it describes itself like its source) and the written files' names,
    hashes and sizes are recorded in it (onnxio.record_files)."""
    from .artifacts import set_contract
    from .onnxio import check_model, load_model, record_files, release_memory, save_model, staged_graph

    model = load_model(src)
    # in place: a copy of the FP32 graph next to it took the ViT-H/14 conversion past 13 GiB
    fp16, report = convert_to_fp16(model, extra_fp32_ops, inplace=True)
    del model
    release_memory()
    if manifest is not None:
        set_contract(fp16, manifest)
    with staged_graph(dst) as tmp:
        data = save_model(fp16, tmp)
        del fp16
        release_memory()
        check_model(tmp)
        if manifest is not None:
            record_files(manifest, tmp, data)
    return report
