"""Writing a graph and its manifest as one unit: both land, or neither does."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from clipfuse.runtime.artifact import CONTRACT_KEY, contract_json
from clipfuse.runtime.fileio import atomic_path, sha256_file
from clipfuse.runtime.manifest import manifest_path_for, write_manifest

from .folding import fold_file


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
    import onnx

    model = onnx.load(str(onnx_path))
    set_contract(model, manifest)
    if not atomic:
        onnx.save(model, str(onnx_path))
        return
    with atomic_path(onnx_path) as tmp:
        onnx.save(model, str(tmp))


@contextlib.contextmanager
def graph_with_manifest(onnx_path: Path, manifest: dict) -> Iterator[Path]:
    """Yield a temporary path for the graph; when the block succeeds, constant-fold it
    (export.folding), store the manifest's contract in the graph's metadata_props (the last
    rewrite: nothing may drop it after), run onnx.checker on it, record its sha256 in `manifest`
    and move graph and `NAME.json` into place.

    Any failure inside the block (export, conversion, checker) leaves no file behind.
    """
    import onnx

    with atomic_path(onnx_path) as tmp_onnx, atomic_path(manifest_path_for(onnx_path)) as tmp_json:
        yield tmp_onnx
        manifest["folding"] = fold_file(tmp_onnx)
        write_contract(tmp_onnx, manifest, atomic=False)
        onnx.checker.check_model(str(tmp_onnx))
        manifest["onnx_sha256"] = sha256_file(tmp_onnx)
        write_manifest(tmp_json, manifest)
