"""Constant folding of every exported graph (one call in artifacts.graph_with_manifest).

The TorchScript exporter leaves the shape arithmetic of every reshape in the graph (Shape ->
Gather -> Unsqueeze -> Concat, Constants, Identity copies of weights): ~70 % of a NACLIP graph's
nodes. onnxslim folds it and removes dead/duplicate nodes; on clipfuse's graphs it went furthest of
the three candidates (tiny-ViT NACLIP: 476 nodes -> onnxslim 110, Polygraphy `FoldConstants` 180,
onnx-graphsurgeon `fold_constants` 312), keeps symbolic axes (batch, classes, masks) symbolic and
changes outputs by float reassociation only (<= 4e-7). Its rewrites are re-checked by
onnx.checker and by the graph checks of `clipfuse build`.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Dict

from clipfuse.runtime.errors import ClipfuseError


def node_counts(model) -> Dict[str, int]:
    """op type -> count, plus 'total'."""
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return {"total": sum(counts.values()), **dict(sorted(counts.items()))}


def _symbolic_io(model) -> Dict[str, tuple]:
    def dims(vi):
        return tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)
    return {vi.name: dims(vi) for vi in list(model.graph.input) + list(model.graph.output)}


# Initializers of this size or more (weight matrices, embeddings) are left out of the copy onnxslim
# folds (declared graph inputs there): it folds the shape arithmetic, not weights (the exporter already folded
# those), and its protobuf <-> graph round trips would otherwise copy every weight several times
# (about 10x the graph at peak). Tensor-for-tensor the same folded graph on every head.
DETACH_MIN_BYTES = 1 << 16


def weightless_skeleton(model):
    """(a copy of `model` without its big initializers, declared as graph inputs instead; the big
    initializers, still owned by `model`). The copy is small: the weights are never copied."""
    import onnx
    from onnx import helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    big = [t for t in graph.initializer if len(t.raw_data) >= DETACH_MIN_BYTES and t.name not in outputs]
    names = {t.name for t in big}
    skel = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(skel, field, getattr(model, field))
    skel.opset_import.extend(model.opset_import)
    skel.metadata_props.extend(model.metadata_props)
    skel.functions.extend(model.functions)
    g = skel.graph
    g.name, g.doc_string = graph.name, graph.doc_string
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.initializer.extend(t for t in graph.initializer if t.name not in names)
    g.sparse_initializer.extend(graph.sparse_initializer)
    return skel, big


def _attach_weights(model, weights: list, io_names: set) -> None:
    """The folded skeleton gets back the weights it still uses, as initializers."""
    graph = model.graph
    names = {t.name for t in weights}
    kept_inputs = [i for i in graph.input if i.name not in names or i.name in io_names]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    graph.initializer.extend(t for t in weights if t.name in used)


def fold_file(path: Path) -> Dict[str, int]:
    """fold_model on a file, in place (external data read from and written beside it)."""
    from .onnxio import load_model, save_model

    folded, counts = fold_model(load_model(path), Path(path).name)
    save_model(folded, path)
    return counts


def fold_model(model, label: str = "graph"):
    """Fold `model` (consumed); return (folded model, {"nodes_before", "nodes_after"}). Also
    refuses a graph whose UInt8 input does not go straight into a Cast
    (graph_checks.uint8_only_into_cast).

    Refuses (ClipfuseError) a result whose graph inputs/outputs changed name, dtype or shape:
    the manifest describes them, and the batch axis must stay dynamic.
    """
    try:
        import onnxslim
    except ImportError:
        raise ClipfuseError("onnxslim is not installed: pip install 'clipfuse[export]' "
                            "(exports are constant-folded with it)") from None

    before = len(model.graph.node)
    io_before = _symbolic_io(model)
    types_before = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.input) + list(model.graph.output)}
    skeleton, weights = weightless_skeleton(model)
    folded = onnxslim.slim(skeleton)
    del skeleton
    if folded is None:
        raise ClipfuseError(f"onnxslim could not fold {label}")
    _attach_weights(folded, weights, set(io_before))
    del weights, model
    if _symbolic_io(folded) != io_before or \
            {vi.name: vi.type.tensor_type.elem_type for vi in list(folded.graph.input) + list(folded.graph.output)} != types_before:
        raise ClipfuseError(f"constant folding changed the inputs/outputs of {label}: "
                            f"{io_before} -> {_symbolic_io(folded)}")
    # Every graph clipfuse writes must be TensorRT-legal, not only those that reach `clipfuse build`.
    from .graph_checks import uint8_only_into_cast
    illegal = uint8_only_into_cast(folded)
    if illegal:
        raise ClipfuseError(f"{label} is not TensorRT-legal: {illegal[0]}")
    return folded, {"nodes_before": before, "nodes_after": len(folded.graph.node)}
