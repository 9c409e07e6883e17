"""The JSON manifest that travels beside every artifact (.onnx, .engine).

It is the I/O contract for C++ consumers too: names, dtypes, shapes and layouts of the graph,
the vocabulary, and the protocol defaults the runtime needs. Artifacts flow one way
(model -> ONNX + manifest -> engine + manifest -> runtime); each stage copies the manifest and adds
its own section, so the runtime can check that an engine and its manifest belong together.

Writers build the JSON object (`new_manifest`, `io_spec`) and write it once
(clipfuse.export.artifacts.graph_with_manifest); readers get it typed: one frozen dataclass per
kind (`ImageManifest`, `FrameManifest`, `TextManifest`, `ReferManifest`; below), parsed and
validated once by the opener (clipfuse.runtime.artifact.open_artifact -> `Artifact.meta`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

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


# -- typed manifests ---------------------------------------------------------------------------
# One frozen dataclass per artifact kind, parsed and type-checked ONCE (by the opener,
# clipfuse.runtime.artifact); everything downstream reads attributes. JSON arrays become tuples,
# objects that the runtime only forwards (protocol, normalization, refer, folding) stay mappings.
# Keys this clipfuse does not know are kept in `extra`, and `to_dict` writes every key back in its
# original order with its original value, so a manifest round-trips byte-identically (the contract
# hashes and graph identity depend on the exact JSON).

M = TypeVar("M", bound="Manifest")


def _spec(key: Optional[str] = None, check: str = "any", default: Any = None) -> Any:
    """A manifest field: JSON `key` (default: the attribute name) validated by `check`."""
    return field(default=default, metadata={"key": key, "check": check})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _tuplify(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    return v


def _listify(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_listify(x) for x in v]
    if isinstance(v, (TensorSpec, EngineSection, HeadInfo)):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {k: _listify(x) for k, x in v.items()}
    return v


def _check(kind: str, value: Any, where: str, name: str) -> Any:
    """The JSON `value` as the typed value of a field, or one ClipfuseError line naming the field."""
    def bad(what: str) -> ClipfuseError:
        shown = json.dumps(value, ensure_ascii=False, default=str)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return ClipfuseError(f"{where}: manifest field {name!r} must be {what}, got {shown}")

    if kind == "any":
        return _tuplify(value)
    if value is None and kind.startswith("opt_"):
        return None
    kind = kind[4:] if kind.startswith("opt_") else kind
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "int":
        if not _is_int(value):
            raise bad("an integer")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "dims":       # a list of positive integers (input_size, frame_size, grid, ...)
        if not isinstance(value, list) or not value or not all(_is_int(v) and v > 0 for v in value):
            raise bad("a list of positive integers")
        return tuple(value)
    if kind == "strs":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if kind == "classes":    # one list of synonyms per class
        if not isinstance(value, list) or not all(
                isinstance(c, list) and c and all(isinstance(n, str) for n in c) for c in value):
            raise bad("a list of lists of class names")
        return tuple(tuple(c) for c in value)
    if kind == "object":
        if not isinstance(value, dict):
            raise bad("an object")
        return value
    if kind == "io":
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise bad("a list of tensor objects")
        return tuple(TensorSpec.from_dict(t, where, f"{name}[{i}]") for i, t in enumerate(value))
    if kind == "head":
        if not isinstance(value, dict):
            raise bad("an object with name and params")
        return HeadInfo.from_dict(value, where)
    if kind == "engine":
        if not isinstance(value, dict):
            raise bad("an object")
        return EngineSection.from_dict(value, where)
    raise AssertionError(kind)


class _Typed:
    """from_dict / to_dict over dataclass fields declared with `_spec`."""

    extra: Mapping[str, Any]
    _keys: Tuple[str, ...]

    @classmethod
    def _fields(cls):
        return [f for f in fields(cls) if "check" in f.metadata]

    @classmethod
    def _parse(cls, data: Mapping[str, Any], where: str, prefix: str = "") -> Dict[str, Any]:
        values: Dict[str, Any] = {}
        known = set()
        for f in cls._fields():
            key = f.metadata["key"] or f.name
            known.add(key)
            if key in data:
                values[f.name] = _check(f.metadata["check"], data[key], where, prefix + key)
        values["extra"] = {k: v for k, v in data.items() if k not in known}
        values["_keys"] = tuple(data)
        return values

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object again: original keys in original order, then fields set since."""
        by_key = {(f.metadata["key"] or f.name): f for f in self._fields()}
        out: Dict[str, Any] = {}
        for key in self._keys:
            if key in by_key:
                out[key] = _listify(getattr(self, by_key[key].name))
            elif key in self.extra:
                out[key] = self.extra[key]
        for key, f in by_key.items():
            value = getattr(self, f.name)
            if key not in out and value is not None and value != f.default:
                out[key] = _listify(value)
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out


@dataclass(frozen=True)
class TensorSpec(_Typed):
    """One entry of `inputs`/`outputs` (io_spec); symbolic dims are strings."""

    name: str = _spec(check="str", default="")
    dtype: Optional[str] = _spec(check="opt_str")     # absent only in hand-made partial manifests
    shape: Tuple[Any, ...] = _spec(check="any", default=())
    layout: Optional[str] = _spec(check="opt_str")
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    _keys: Tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest", name: str = "tensor") -> "TensorSpec":
        values = cls._parse(data, where, f"{name}.")
        for required in ("name", "shape"):
            if required not in data:
                raise ClipfuseError(f"{where}: manifest field {name!r} lacks {required!r}")
        if not isinstance(data["shape"], list):
            raise ClipfuseError(f"{where}: manifest field '{name}.shape' must be a list")
        return cls(**values)


@dataclass(frozen=True)
class HeadInfo(_Typed):
    """`head`: the method (a key of clipfuse.runtime.methods.METHODS) and its effective parameters."""

    name: str = _spec(check="str", default="")
    params: Mapping[str, Any] = _spec(check="object", default=None)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    _keys: Tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> "HeadInfo":
        values = cls._parse(data, where, "head.")
        if "name" not in data:
            raise ClipfuseError(f"{where}: manifest field 'head' lacks 'name'")
        values.setdefault("params", {})
        return cls(**values)


@dataclass(frozen=True)
class EngineSection(_Typed):
    """`engine`: what `clipfuse build` recorded and the runtime checks before loading."""

    file: Optional[str] = _spec(check="opt_str")
    sha256: Optional[str] = _spec(check="opt_str")
    flavour: Optional[str] = _spec(check="opt_str")
    tensorrt_version: Optional[str] = _spec(check="opt_str")
    targets: Optional[Tuple[str, ...]] = _spec(check="any")
    sm: Optional[str] = _spec(check="any")                 # engines built before `targets`
    gpu_name: Optional[str] = _spec(check="any")
    precision: Optional[str] = _spec(check="opt_str")
    strongly_typed: Optional[bool] = _spec(check="opt_bool")
    batch_profile: Optional[Tuple[int, ...]] = _spec(check="any")     # checked where used (triton-repo)
    onnx_sha256: Optional[str] = _spec(check="opt_str")
    command: Optional[str] = _spec(check="any")
    workspace_bytes: Optional[int] = _spec(check="any")
    opt_level: Optional[int] = _spec(check="any")
    timing_cache: Optional[str] = _spec(check="any")
    io: Optional[Mapping[str, Any]] = _spec(check="opt_object")
    build_seconds: Optional[float] = _spec(check="any")
    contract_sha256: Optional[str] = _spec(check="opt_str")
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    _keys: Tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> "EngineSection":
        return cls(**cls._parse(data, where, "engine."))


@dataclass(frozen=True)
class Manifest(_Typed):
    """Fields every artifact kind has (graph I/O, weights, file hashes, the engine section)."""

    KINDS: ClassVar[Tuple[str, ...]] = ()
    format: str = _spec(check="str", default=FORMAT)
    format_version: int = _spec(check="int", default=FORMAT_VERSION)
    kind: str = _spec(check="str", default="")
    clipfuse_version: Optional[str] = _spec(check="opt_str")
    model: Optional[str] = _spec(check="opt_str")
    pretrained: Optional[str] = _spec(check="opt_str")
    pretrained_source: Optional[str] = _spec(check="opt_str")
    seed: Optional[int] = _spec(check="opt_int")
    quick_gelu: Optional[bool] = _spec(check="opt_bool")
    embed_dim: Optional[int] = _spec(check="opt_int")
    inputs: Tuple[TensorSpec, ...] = _spec(check="io", default=())
    outputs: Tuple[TensorSpec, ...] = _spec(check="io", default=())
    opset: Optional[int] = _spec(check="opt_int")
    precision: Optional[str] = _spec(check="opt_str")
    onnx_file: Optional[str] = _spec(check="opt_str")
    onnx_sha256: Optional[str] = _spec(check="opt_str")
    onnx_data_file: Optional[str] = _spec(check="any")     # checked with its file (artifact.check_data_file)
    onnx_data_sha256: Optional[str] = _spec(check="opt_str")
    onnx_data_bytes: Optional[int] = _spec(check="opt_int")
    source_onnx_sha256: Optional[str] = _spec(check="opt_str")   # fp16 graphs and engines: the fp32 source
    engine: Optional[EngineSection] = _spec(check="opt_engine")
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    _keys: Tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_dict(cls: Type[M], data: Mapping[str, Any], where: str = "manifest") -> M:
        """Validate once; one ClipfuseError line naming the field on a wrong type."""
        if not isinstance(data, Mapping):
            raise ClipfuseError(f"{where}: a manifest is a JSON object")
        return cls(**cls._parse(data, where))

    @property
    def output_name(self) -> str:
        """The first output (the scores or features), as the runtime feeds it back."""
        return self.outputs[0].name if self.outputs else "scores"

    @property
    def is_fp16(self) -> bool:
        return self.precision == "fp16"

    @property
    def head_name(self) -> Optional[str]:
        head = getattr(self, "head", None)
        return head.name if head is not None else None


@dataclass(frozen=True)
class ImageManifest(Manifest):
    """kind "image": a fused window graph, [B, S, S, 3] uint8 -> [B, K, g, g] scores."""

    KINDS: ClassVar[Tuple[str, ...]] = ("image",)
    head: Optional[HeadInfo] = _spec(check="opt_head")
    heads_checkpoint_source: Optional[str] = _spec(check="opt_str")
    heads_checkpoint: Optional[str] = _spec(check="any")
    classes: Tuple[Tuple[str, ...], ...] = _spec(check="classes", default=())
    templates: Optional[str] = _spec(check="opt_str")
    vocab: str = _spec(check="str", default="baked")
    input_size: Optional[Tuple[int, ...]] = _spec(check="opt_dims")
    patch_size: Optional[int] = _spec(check="opt_int")
    grid: Optional[Tuple[int, ...]] = _spec(check="opt_dims")
    protocol: Optional[Mapping[str, Any]] = _spec(check="opt_object")
    normalization: Optional[Mapping[str, Any]] = _spec(check="opt_object")

    @property
    def window(self) -> int:
        if not self.input_size:
            raise ClipfuseError("manifest has no input_size; re-export the model")
        return int(self.input_size[0])

    @property
    def dynamic_vocab(self) -> bool:
        return self.vocab == "dynamic"


@dataclass(frozen=True)
class FrameManifest(ImageManifest):
    """kind "frame": the whole protocol for one frame size, baked in (clipfuse.export.frame_graph)."""

    KINDS: ClassVar[Tuple[str, ...]] = ("frame",)
    frame_size: Tuple[int, ...] = _spec(check="dims", default=())
    processing_size: Tuple[int, ...] = _spec(check="dims", default=())
    num_windows: int = _spec(check="int", default=0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> "FrameManifest":
        missing = [k for k in ("frame_size", "processing_size", "num_windows") if k not in data]
        if missing:
            raise ClipfuseError(f"{where}: frame manifest lacks {', '.join(missing)}; re-export it")
        return super().from_dict(data, where)


@dataclass(frozen=True)
class TextManifest(Manifest):
    """kind "text": CLIP's text tower, token ids -> text features."""

    KINDS: ClassVar[Tuple[str, ...]] = ("text",)
    context_length: int = _spec(check="int", default=77)
    tokenizer: Optional[str] = _spec(check="opt_str")
    vocab_size: Optional[int] = _spec(check="opt_int")
    templates: Optional[str] = _spec(check="opt_str")


@dataclass(frozen=True)
class ReferManifest(Manifest):
    """kinds "refer-global" / "refer-local": Global-Local CLIP's mask-pooled image features."""

    KINDS: ClassVar[Tuple[str, ...]] = ("refer-global", "refer-local")
    input_size: Optional[Tuple[int, ...]] = _spec(check="opt_dims")
    patch_size: Optional[int] = _spec(check="opt_int")
    grid: Optional[Tuple[int, ...]] = _spec(check="opt_dims")
    normalization: Optional[Mapping[str, Any]] = _spec(check="opt_object")
    refer: Optional[Mapping[str, Any]] = _spec(check="opt_object")


MANIFEST_TYPES: Tuple[Type[Manifest], ...] = (ImageManifest, FrameManifest, TextManifest, ReferManifest)


def manifest_type(kind: Any) -> Type[Manifest]:
    """The dataclass of a manifest kind (the common part, Manifest, for kinds this clipfuse lacks)."""
    for cls in MANIFEST_TYPES:
        if kind in cls.KINDS:
            return cls
    return Manifest


def parse_manifest(data: Mapping[str, Any], where: str = "manifest") -> Manifest:
    """A manifest dict (read_manifest, or built by an exporter) as its typed form."""
    if isinstance(data, Manifest):
        return data
    if not isinstance(data, Mapping):
        raise ClipfuseError(f"{where}: a manifest is a JSON object")
    # no kind: a partial dict built in code (kinds arrived with the first manifests of window graphs)
    return manifest_type(data.get("kind", "image")).from_dict(data, where)


def load_manifest(path: "str | Path") -> Manifest:
    """read_manifest + parse_manifest: the typed manifest of a file."""
    return parse_manifest(read_manifest(path), Path(path).name)
