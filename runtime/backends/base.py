"""The one interface every backend implements, and the registry that picks one.

A backend runs ONE exported graph: named numpy inputs in, named numpy outputs out, with the
shapes/dtypes of the manifest. All pre/post-processing (resize, windows, averaging, thresholds)
lives in clipfuse.runtime.protocol and is shared by every backend.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ..errors import ClipfuseError


class Backend:
    """Base class. Subclasses set `name` and implement `run`."""

    name: str = "?"
    # Largest batch one call accepts (engine profile max); None = no limit.
    max_batch: Optional[int] = None

    def __init__(self, artifact: Path, manifest: dict, **options) -> None:
        self.artifact = Path(artifact)
        self.manifest = manifest
        self.options = options
        # What the graph is computed in, recorded in outputs; backends that choose (openvino) set it.
        self.precision: str = str(manifest.get("precision") or "fp32")

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

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
    "torch": ("clipfuse.runtime.backends.torch_ref", "TorchReferenceBackend", (".onnx", ".engine")),
}


def run_in_chunks(backend, feeds: Dict[str, np.ndarray], batched: str) -> Dict[str, np.ndarray]:
    """Run `feeds` with the `batched` input cut to `backend.max_batch` (an engine's profile; None:
    one call) and every output concatenated along axis 0. The other inputs go whole to each call."""
    total = len(feeds[batched])
    step = backend.max_batch or total
    parts = []
    for start in range(0, total, step):
        part = dict(feeds)
        part[batched] = feeds[batched][start:start + step]
        parts.append(backend.run(part))
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def register_backend(name: str, module: str, cls: str, suffixes: tuple) -> None:
    _REGISTRY[name] = (module, cls, suffixes)


def available_backends() -> List[str]:
    return list(_REGISTRY)


def _load_class(name: str) -> Callable[..., Backend]:
    module_name, cls_name, _ = _REGISTRY[name]
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
    if backend not in _REGISTRY:
        raise ClipfuseError(f"unknown backend {backend!r}; choose one of: {', '.join(_REGISTRY)}")
    suffixes = _REGISTRY[backend][2]
    if artifact.suffix not in suffixes:
        raise ClipfuseError(f"backend {backend!r} opens {'/'.join(suffixes)} files, not {artifact.name}")
    return _load_class(backend)(artifact, manifest, backend=backend, **options)
