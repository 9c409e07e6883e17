"""The one interface every backend implements, and the registry that picks one.

A backend runs ONE exported graph: named numpy inputs in, named numpy outputs out, with the
shapes/dtypes of the manifest. All pre/post-processing (resize, windows, averaging, thresholds)
lives in clipfuse.runtime.protocol and is shared by every backend.

The runner interface (shaped like Polygraphy's runners), what run/compare/serve/eval/bench call:
  open        `open_backend(artifact, manifest, name, **options)`: the artifact is opened and
              checked by clipfuse.runtime.artifact before a backend sees it; the constructor loads
              (session, engine, compiled model) and raises ClipfuseError with one line if it cannot.
  infer       `run(feeds) -> outputs` (host numpy in and out; `run_in_chunks` caps the batch at
              `max_batch`, protocol.in_chunks being the one chunking rule);
  timing      `stage(feeds)` puts inputs where the backend computes (host array, device buffer,
              bound OrtValue, shared infer-request tensor), `launch()` runs one call on what is
              staged without copies back, `synchronize() -> None` waits for it: the benchmarks'
              "model" scope. The defaults stage on the host and launch `run`; a device backend
              (TensorRT, ONNX Runtime CUDA with IOBinding and CUDA graphs) and OpenVINO override
              them. Nothing is returned from the three: outputs come from `run`;
  memory      `device_memory_bytes()`: bytes in use on the device the backend computes on where it
              knows them (None for host backends);
  describe    `name`, `precision` (what actually computes, recorded in outputs), `max_batch`;
  close       `close()` (also a context manager).
A backend of another package registers by entry point (group `clipfuse.backends`, "NAME =
module:Class", the class sets `suffixes`): the PyTorch reference does so from clipfuse.export.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ..errors import ClipfuseError
from ..manifest import Manifest, parse_manifest


class Backend:
    """Base class. Subclasses set `name` and implement `run`."""

    name: str = "?"
    # Artifact suffixes it opens (an entry-point backend declares them here).
    suffixes: tuple = (".onnx",)
    # Largest batch one call accepts (engine profile max); None = no limit.
    max_batch: Optional[int] = None

    def __init__(self, artifact: Path, manifest: "Manifest | dict", **options) -> None:
        self.artifact = Path(artifact)
        self._meta: Optional[Manifest] = parse_manifest(manifest, self.artifact.name)
        # the JSON form too, for code that copies it (benchmarks' fp16 graphs)
        self.manifest = self._meta.to_dict() if isinstance(manifest, Manifest) else manifest
        self.options = options
        # What the graph is computed in, recorded in outputs; backends that choose (openvino) set it.
        self.precision: str = str(self.meta.precision or "fp32")

    @property
    def meta(self) -> Manifest:
        """The typed manifest (parsed once; also for a backend whose `manifest` was set directly)."""
        meta = self.__dict__.get("_meta")
        if meta is None:
            meta = self._meta = parse_manifest(self.manifest, self.artifact.name)
        return meta

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    # timing: stage once, launch many times, synchronize (defaults: on the host, through `run`)
    def stage(self, feeds: Dict[str, np.ndarray]) -> None:
        self._staged = {name: np.ascontiguousarray(value) for name, value in feeds.items()}

    def launch(self) -> None:
        self.run(self._staged)

    def synchronize(self) -> None:
        """Wait for the launched call (host backends: `launch` already returned with it)."""

    def device_memory_bytes(self) -> Optional[int]:
        """Bytes in use on the backend's device (device-wide where that is all the driver says);
        None when the backend computes on the host or cannot tell."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# name -> (module, class name, artifact suffixes it opens)
_REGISTRY: Dict[str, tuple] = {
    "ort-cpu": ("clipfuse.runtime.backends.onnxruntime", "OrtBackend", (".onnx",)),
    # the GPU providers: device-resident I/O and CUDA graphs (onnxruntime-gpu)
    "ort-cuda": ("clipfuse.runtime.backends.ort_cuda", "OrtCudaBackend", (".onnx",)),
    "ort-trt": ("clipfuse.runtime.backends.ort_cuda", "OrtCudaBackend", (".onnx",)),
    "tensorrt": ("clipfuse.runtime.backends.tensorrt", "TensorRTBackend", (".engine",)),
    "openvino": ("clipfuse.runtime.backends.openvino", "OpenVINOBackend", (".onnx",)),
}
# Backends other packages contribute (the PyTorch reference lives in clipfuse.export): entry points
# "NAME = module:Class" whose class sets `suffixes`; read once, when a backend is first looked up.
ENTRY_POINT_GROUP = "clipfuse.backends"
_entry_points_read = False


def _registry() -> Dict[str, tuple]:
    global _entry_points_read
    if not _entry_points_read:
        _entry_points_read = True
        from importlib.metadata import entry_points
        try:
            found = entry_points(group=ENTRY_POINT_GROUP)
        except TypeError:          # Python 3.9: entry_points() is a dict of groups
            found = entry_points().get(ENTRY_POINT_GROUP, [])
        for ep in found:
            module, _, cls = ep.value.partition(":")
            _REGISTRY.setdefault(ep.name, (module, cls, None))
    return _REGISTRY


def run_in_chunks(backend, feeds: Dict[str, np.ndarray], batched: str) -> Dict[str, np.ndarray]:
    """Run `feeds` with the `batched` input cut to `backend.max_batch` (an engine's profile; None:
    one call; protocol.in_chunks) and every output concatenated along axis 0. The other inputs go
    whole to each call."""
    from ..protocol import in_chunks
    parts = in_chunks(lambda part: backend.run({**feeds, batched: part}), feeds[batched], backend.max_batch)
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def register_backend(name: str, module: str, cls: str, suffixes: tuple) -> None:
    _REGISTRY[name] = (module, cls, suffixes)


def available_backends() -> List[str]:
    return list(_registry())


def backend_help() -> str:
    """The --backend help every command shows, from the registry."""
    return (f"auto (tensorrt for .engine, ort-cpu for .onnx), {', '.join(available_backends())} "
            "(default: %(default)s)")


def _load_class(name: str) -> Callable[..., Backend]:
    module_name, cls_name, _ = _registry()[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ClipfuseError(f"backend {name!r} is not usable here: {exc}") from None
    return getattr(module, cls_name)


def open_backend(artifact: "str | Path", manifest: dict, backend: str = "auto", **options) -> Backend:
    """Open `artifact` with the named backend; "auto" = tensorrt for .engine, else ort-cpu."""
    artifact = Path(artifact)
    if backend == "auto":
        backend = "tensorrt" if artifact.suffix == ".engine" else "ort-cpu"
    if backend not in _registry():
        raise ClipfuseError(f"unknown backend {backend!r}; choose one of: {', '.join(_registry())}")
    suffixes = _REGISTRY[backend][2]
    cls = None
    if suffixes is None:            # an entry-point backend says what it opens on its class
        cls = _load_class(backend)
        suffixes = cls.suffixes
    if artifact.suffix not in suffixes:
        raise ClipfuseError(f"backend {backend!r} opens {'/'.join(suffixes)} files, not {artifact.name}")
    return (cls or _load_class(backend))(artifact, manifest, backend=backend, **options)
