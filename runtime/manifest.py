"""The JSON manifest that travels beside every artifact (.onnx, .engine).

It is the I/O contract for C++ consumers too: names, dtypes, shapes and layouts of the graph,
the vocabulary, and the protocol defaults the runtime needs. Artifacts flow one way
(model -> ONNX + manifest -> engine + manifest -> runtime); each stage copies the manifest and adds
its own section, so the runtime can check that an engine and its manifest belong together.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from ._version import __version__
from .errors import ClipfuseError
from .fileio import write_text_atomic

FORMAT = "clipfuse-manifest"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "kind", "inputs", "outputs")


def manifest_path_for(artifact: "str | Path") -> Path:
    """`dir/name.onnx` -> `dir/name.json` (also for .engine)."""
    return Path(artifact).with_suffix(".json")


def new_manifest(kind: str, **fields: Any) -> Dict[str, Any]:
    data: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "clipfuse_version": __version__,
    }
    data.update(fields)
    return data


def write_manifest(path: "str | Path", data: Dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_manifest(path: "str | Path") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ClipfuseError(f"manifest not found: {path} (every artifact needs its .json beside it)")
    from .limits import load_json_text

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ClipfuseError(f"manifest {path} is not UTF-8 text") from None
    data = load_json_text(text, f"manifest {path}")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ClipfuseError(f"{path} is not a clipfuse manifest (missing format={FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ClipfuseError(
            f"{path}: manifest format_version {data.get('format_version')} is not supported "
            f"by clipfuse {__version__} (expects {FORMAT_VERSION}); re-export the model")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ClipfuseError(f"{path}: manifest lacks {', '.join(missing)}")
    return data


def io_spec(name: str, dtype: str, shape: List[Any], layout: str, **extra: Any) -> Dict[str, Any]:
    """One entry of `inputs`/`outputs`; symbolic dims are strings (e.g. "batch")."""
    spec = {"name": name, "dtype": dtype, "shape": list(shape), "layout": layout}
    spec.update(extra)
    return spec
