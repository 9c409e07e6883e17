"""The one way every command opens an artifact (.onnx graph or .engine) with its manifest.

    art = open_artifact("engines/sclip.onnx", kinds=("image",))
    art.meta.classes                    # the typed manifest (clipfuse.runtime.manifest.ImageManifest)

Checks, in order, each failing with one line (ClipfuseError):
1. the file exists and is a .onnx or .engine; its manifest NAME.json sits beside it and parses;
2. the manifest's `kind` is one the caller can use, and its fields have their types (parsed once
   into the kind's dataclass, `Artifact.meta`; the JSON dict stays as `Artifact.manifest` for
   the stages that copy it and add their section: fp16, build);
3. a graph with ONNX external data (`onnx_data_file` in the manifest, clipfuse.export.onnxio) has
   that one data file beside it, of the recorded size, always (cheap);
3b. the file's SHA-256 equals the manifest's (`onnx_sha256`, or `engine.sha256`), and the data
   file's equals `onnx_data_sha256`, unless verify=False (hashing a big engine on an SD card is slow);
4. the manifest agrees with the CONTRACT stored in the model itself (below), always (cheap).

The contract: the manifest fields a wrong value of which silently gives wrong results (classes,
protocol, head, vocabulary, weights, versions; see CONTRACT_FIELDS) are written, as one compact
JSON object with sorted keys, into the ONNX graph's `metadata_props` under the key
`clipfuse.contract` when the graph is written (clipfuse.export.artifacts.graph_with_manifest).
A C++ user reads the class names from the model file itself (Ort::ModelMetadata::
LookupCustomMetadataMapAllocated("clipfuse.contract"), or onnx's ModelProto.metadata_props). A manifest
edited by hand (a class renamed, the count kept) no longer matches and is refused. A TensorRT
engine keeps no ONNX metadata: `clipfuse build` records the contract's SHA-256 in the engine's
manifest (`engine.contract_sha256`), checked the same way; an engine manifest without it (built
before contracts existed) skips this check (`Artifact.contract_checked` is False).

Reading metadata_props needs neither torch nor onnx: `read_onnx_metadata` walks the top level of
the protobuf wire format and seeks past the graph, so it costs microseconds for any model size,
and it reports a truncated file as such.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Dict, Optional, Sequence, Tuple, Union

from .errors import ClipfuseError
from .fileio import sha256_file
from .manifest import Manifest, manifest_path_for, parse_manifest, read_manifest

ARTIFACT_SUFFIXES = (".onnx", ".engine")
CONTRACT_KEY = "clipfuse.contract"
# Manifest fields that define what the model's outputs MEAN; absent fields are left out.
# precision, inputs, outputs and grid are read by the backends and copied into outputs: an edited
# value would feed a wrong tensor contract or report a precision the graph does not have.
CONTRACT_FIELDS = ("kind", "format_version", "clipfuse_version", "model", "pretrained", "seed", "head",
                   "classes", "vocab", "templates", "embed_dim", "input_size", "normalization",
                   "protocol", "tokenizer", "context_length", "refer", "precision", "inputs", "outputs",
                   "grid")
# Fields that joined the contract later: a graph (or engine) written before carries a contract
# without them and keeps loading, checked on the fields it has (re-export to cover these too).
LATER_CONTRACT_FIELDS = ("precision", "inputs", "outputs", "grid")


def contract_of(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The contract part of a manifest, normalised through JSON (tuples -> lists)."""
    return json.loads(contract_json(manifest))


def contract_json(manifest: Dict[str, Any], fields: Tuple[str, ...] = CONTRACT_FIELDS) -> str:
    """The compact JSON text stored under CONTRACT_KEY."""
    picked = {k: manifest[k] for k in fields if k in manifest}
    return json.dumps(picked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def contract_sha256(manifest: Dict[str, Any], fields: Tuple[str, ...] = CONTRACT_FIELDS) -> str:
    return hashlib.sha256(contract_json(manifest, fields).encode("utf-8")).hexdigest()


_EARLIER_FIELDS = tuple(f for f in CONTRACT_FIELDS if f not in LATER_CONTRACT_FIELDS)


# -- ONNX metadata without onnx ---------------------------------------------------------------
_GRAPH_FIELD = 7            # ModelProto.graph
_METADATA_FIELD = 14        # ModelProto.metadata_props (repeated StringStringEntryProto)


def _read_varint(fh: BinaryIO) -> Optional[int]:
    value, shift = 0, 0
    while True:
        byte = fh.read(1)
        if not byte:
            return None if shift == 0 else -1  # clean end of message / cut inside a varint
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            return -1


def _parse_entry(data: bytes) -> Tuple[str, str]:
    """StringStringEntryProto bytes -> (key, value)."""
    fields: Dict[int, str] = {}
    pos = 0
    while pos < len(data):
        tag, pos = _varint_at(data, pos)
        length, pos = _varint_at(data, pos)
        if tag & 7 != 2 or pos + length > len(data):
            raise ValueError("malformed metadata entry")
        fields[tag >> 3] = data[pos:pos + length].decode("utf-8")
        pos += length
    return fields.get(1, ""), fields.get(2, "")


def _varint_at(data: bytes, pos: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("malformed varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def read_onnx_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """metadata_props of an ONNX file as a dict, reading only the model's top-level fields.

    Raises ClipfuseError when the file is not a complete ONNX model (truncated, empty, not protobuf).
    """
    path = Path(path)
    size = path.stat().st_size
    props: Dict[str, str] = {}
    has_graph = False
    bad = None
    with open(path, "rb") as fh:
        while True:
            tag = _read_varint(fh)
            if tag is None:
                break
            wire = tag & 7 if tag >= 0 else -1
            if wire == 0:
                if _read_varint(fh) in (None, -1):
                    bad = "cut inside a field"
                    break
            elif wire == 1 or wire == 5:
                step = 8 if wire == 1 else 4
                if fh.tell() + step > size:
                    bad = "cut inside a field"
                    break
                fh.seek(step, 1)
            elif wire == 2:
                length = _read_varint(fh)
                if length in (None, -1) or fh.tell() + length > size:
                    bad = "truncated: a field runs past the end of the file"
                    break
                if tag >> 3 == _METADATA_FIELD:
                    try:
                        key, value = _parse_entry(fh.read(length))
                    except (ValueError, UnicodeDecodeError):
                        bad = "malformed metadata_props"
                        break
                    props[key] = value
                else:
                    has_graph |= tag >> 3 == _GRAPH_FIELD
                    fh.seek(length, 1)
            else:
                bad = "not a protobuf message"
                break
    if bad is None and not has_graph:
        bad = "no graph in it"
    if bad:
        raise ClipfuseError(f"{path} is not a complete ONNX model ({bad}); re-export it or copy it again")
    return props


# -- the opener -------------------------------------------------------------------------------
@dataclass
class Artifact:
    path: Path
    manifest: Dict[str, Any]    # the JSON object as written (copied and extended by fp16/build)
    contract_checked: bool      # False only for engines built before contracts were recorded
    meta: Manifest              # the same, typed and validated: what every reader uses

    @property
    def is_engine(self) -> bool:
        return self.path.suffix == ".engine"


def _first_difference(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return "?"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_contract(path: Path, manifest: Dict[str, Any]) -> bool:
    """Refuse a manifest that disagrees with the contract in the graph (or, for an engine, with
    the contract digest recorded at build time). Returns whether a contract was checked."""
    mpath = manifest_path_for(path)
    if path.suffix == ".engine":
        expected = (manifest.get("engine") or {}).get("contract_sha256")
        if not expected:
            return False
        if expected not in (contract_sha256(manifest), contract_sha256(manifest, _EARLIER_FIELDS)):
            raise ClipfuseError(f"{mpath} was edited after {path.name} was built (its classes, protocol "
                                "or head differ from the build's): rebuild, or restore the manifest")
        return True
    stored = read_onnx_metadata(path).get(CONTRACT_KEY)
    if stored is None:
        raise ClipfuseError(f"{path.name} carries no clipfuse contract in its metadata (exported by an "
                            "older clipfuse, or not by clipfuse): re-export it")
    try:
        in_graph = json.loads(stored)
    except json.JSONDecodeError:
        raise ClipfuseError(f"{path.name}: its clipfuse contract is not valid JSON; re-export it") from None
    in_manifest = contract_of(manifest)
    if isinstance(in_graph, dict) and not any(k in in_graph for k in LATER_CONTRACT_FIELDS):
        in_manifest = json.loads(contract_json(manifest, _EARLIER_FIELDS))
    if in_graph != in_manifest:
        key = _first_difference(in_manifest, in_graph)
        raise ClipfuseError(f"{mpath.name} disagrees with {path.name} on {key!r} (manifest "
                            f"{_short(in_manifest.get(key))}, graph {_short(in_graph.get(key))}): "
                            "restore the manifest that came with the graph, or re-export")
    return True


def check_data_file(path: Path, manifest: Dict[str, Any], verify: bool = True) -> Optional[Path]:
    """The graph's external-data file (None for a single-file graph): present beside the graph,
    of the recorded size, and (verify) of the recorded SHA-256."""
    name = manifest.get("onnx_data_file")
    if path.suffix != ".onnx" or not name:
        return None
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise ClipfuseError(f"{manifest_path_for(path).name}: onnx_data_file must be a file name beside "
                            f"{path.name}, not {name!r}")
    data = path.with_name(name)
    if not data.is_file():
        raise ClipfuseError(f"{path.name} keeps its weights in {name}, which is missing: copy it beside "
                            f"{path.name} (the two travel together), or re-export")
    size = manifest.get("onnx_data_bytes")
    if size is not None and data.stat().st_size != size:
        raise ClipfuseError(f"{name} is {data.stat().st_size} bytes, its manifest says {size}: the copy is "
                            "incomplete or belongs to another export; copy it again or re-export")
    if verify:
        expected = manifest.get("onnx_data_sha256")
        if not expected:
            raise ClipfuseError(f"{manifest_path_for(path).name} records no onnx_data_sha256 for {name}; re-export it")
        actual = sha256_file(data)
        if actual != expected:
            raise ClipfuseError(f"{name} does not match its manifest (data sha256 {actual[:12]}... != "
                                f"{str(expected)[:12]}...): copy the data file that came with {path.name}, "
                                "or re-export")
    return data


def check_hash(path: Path, manifest: Dict[str, Any]) -> None:
    """The file's SHA-256 against its manifest's (a re-exported graph with a stale manifest)."""
    if path.suffix == ".onnx":
        expected, what, field = manifest.get("onnx_sha256"), "onnx", "onnx_sha256"
    else:
        expected, what, field = (manifest.get("engine") or {}).get("sha256"), "engine", "engine.sha256"
    if not expected:
        raise ClipfuseError(f"{manifest_path_for(path).name} records no {field} for {path.name}; re-export it")
    actual = sha256_file(path)
    if actual != expected:
        raise ClipfuseError(f"{path.name} does not match its manifest ({what} sha256 {actual[:12]}... != "
                            f"{str(expected)[:12]}...): re-export, or copy the matching .json beside it")


def open_artifact(path: Union[str, Path], kinds: Optional[Sequence[str]] = None, verify: bool = True,
                  what: str = "model", hint: str = "") -> Artifact:
    """Open `path` + its manifest and run the checks of the module docstring.

    `kinds`: manifest kinds the caller accepts (None: any); `what`/`hint` word the not-found and
    wrong-kind messages (e.g. what="text graph", hint="make one with `clipfuse export-text`").
    """
    path = Path(path)
    if not path.exists():
        raise ClipfuseError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    if path.is_dir() or path.suffix not in ARTIFACT_SUFFIXES:
        raise ClipfuseError(f"{path.name}: expected a .onnx graph or a .engine file")
    manifest = read_manifest(manifest_path_for(path))
    if kinds is not None and manifest.get("kind") not in kinds:
        raise ClipfuseError(f"{path.name} is a {manifest.get('kind')!r} artifact; expected "
                            f"{' or '.join(repr(k) for k in kinds)}" + (f" ({hint})" if hint else ""))
    meta = parse_manifest(manifest, manifest_path_for(path).name)
    if verify:
        check_hash(path, manifest)
    check_data_file(path, manifest, verify)
    checked = check_contract(path, manifest)
    return Artifact(path=path, manifest=manifest, contract_checked=checked, meta=meta)
