"""Writing a graph and its manifest as one unit: both land, or neither does."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Optional

from clipfuse.runtime.artifact import CONTRACT_KEY, contract_json
from clipfuse.runtime.manifest import manifest_path_for, write_manifest

from .folding import fold_model
from .onnxio import check_model, load_model, record_files, release_memory, save_model, staged_graph, write_model


def set_contract(model, manifest: dict) -> None:
    """Store the manifest's contract (clipfuse.runtime.artifact) in `model.metadata_props`,
    replacing an older one, so the graph describes itself (classes, protocol, head, versions)."""
    kept = [p for p in model.metadata_props if p.key != CONTRACT_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = CONTRACT_KEY, contract_json(manifest)


def write_contract(onnx_path: Path, manifest: dict, atomic: bool = True) -> None:
    """set_contract on an ONNX file, in place; `atomic=False` for a file that is itself a
    temporary (no temporary of a temporary to leave behind)."""
    model = load_model(onnx_path)
    set_contract(model, manifest)
    if not atomic:
        save_model(model, onnx_path)
        return
    write_model(model, onnx_path)


@contextlib.contextmanager
def graph_with_manifest(onnx_path: Path, manifest: dict, prepare: Optional[Callable] = None) -> Iterator[Path]:
    """Yield a staging path for the graph (its final name in a staging folder: an exporter may
    write external data beside it); when the block succeeds, constant-fold it (export.folding),
    store the manifest's contract in the graph's metadata_props (the last rewrite: nothing may
    drop it after), write it as one file or graph + data file (export.onnxio), run onnx.checker
    on it, record its hashes in `manifest` and move data file, graph and `NAME.json` into place.

    The graph is loaded once and rewritten once (`prepare(model)`, folding and contract in
    memory). Any failure inside the block (export, conversion, checker) leaves no file behind.
    """
    onnx_path = Path(onnx_path)
    json_path = manifest_path_for(onnx_path)
    with staged_graph(onnx_path, json_path) as tmp_onnx:
        yield tmp_onnx
        release_memory()        # what the exporter freed (torch's graph, serialised proto) goes back first
        model = load_model(tmp_onnx)
        if prepare is not None:
            prepare(model)
        folded, folding = fold_model(model, onnx_path.name)
        manifest.update(folding=folding)
        del model
        release_memory()        # the unfolded graph's weights: the save must not stack on them
        set_contract(folded, manifest)
        data = save_model(folded, tmp_onnx)
        del folded
        release_memory()
        check_model(tmp_onnx)
        record_files(manifest, tmp_onnx, data)
        write_manifest(tmp_onnx.with_name(json_path.name), manifest)
