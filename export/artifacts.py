"""Writing a graph and its manifest as one unit: both land, or neither does."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from clipfuse.runtime.fileio import atomic_path, sha256_file
from clipfuse.runtime.manifest import manifest_path_for, write_manifest

from .folding import fold_file


@contextlib.contextmanager
def graph_with_manifest(onnx_path: Path, manifest: dict) -> Iterator[Path]:
    """Yield a temporary path for the graph; when the block succeeds, constant-fold it
    (export.folding), run onnx.checker on it, record its sha256 in `manifest` and move graph and
    `NAME.json` into place.

    Any failure inside the block (export, conversion, checker) leaves no file behind.
    """
    import onnx

    with atomic_path(onnx_path) as tmp_onnx, atomic_path(manifest_path_for(onnx_path)) as tmp_json:
        yield tmp_onnx
        manifest["folding"] = fold_file(tmp_onnx)
        onnx.checker.check_model(str(tmp_onnx))
        manifest["onnx_sha256"] = sha256_file(tmp_onnx)
        write_manifest(tmp_json, manifest)
