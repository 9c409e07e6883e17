"""`clipfuse serve`: one Triton Inference Server (nvidia-pytriton) serving clipfuse artifacts.

Each artifact becomes one Triton model with dynamic batching:
  input  image       uint8   [-1, -1, 3]   (+ Triton's batch axis: send [1, H, W, 3])
  output labels      int32   [-1, -1]      class index per pixel (names in the config)
         confidence  float32 [-1, -1]      the winning class's score (see labels_and_confidence)
  config parameters  clipfuse_classes, clipfuse_protocol, clipfuse_kind, clipfuse_window, ...
Triton batches concurrent requests of equal image shape (its rule for non-ragged inputs); one
model instance then puts all their windows through the backend together (core.segment_batch).

Traps handled here rather than left to users:
- PyTriton binds every endpoint to 0.0.0.0 by default; ServeOptions.host defaults to 127.0.0.1.
- Triton's Python-backend stub links the libpython3.X it finds on the loader path; where that is
  another build of 3.X than the running interpreter, model loading dies with
  "'_thread.RLock' object has no attribute '_recursion_count'" (deploy.md). The running
  interpreter's LIBDIR goes first on LD_LIBRARY_PATH before the server starts.
- SIGTERM (docker stop, Kubernetes) becomes PyTriton's orderly stop: Triton stops taking new
  requests and waits up to exit_timeout_s for the ones in flight.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ClipfuseError
from ..segmenter import Segmenter
from .core import (DEFAULT_MAX_PIXELS, INPUT, OUTPUTS, BatchStats, check_images, model_parameters,
                   segment_batch)

LOG = logging.getLogger("clipfuse.serve")
SERVED_KINDS = ("image", "frame")  # window graphs (protocol here) and frame graphs (protocol inside)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1             # model instances (threads) per artifact
    max_batch_size: int = 8        # images per Triton batch (dynamic batcher)
    queue_delay_us: int = 2000     # how long Triton waits to fill a batch
    window_batch: Optional[int] = None  # windows per backend call; None: the backend's max
    backend: str = "auto"
    threads: Optional[int] = None  # ONNX Runtime intra-op threads
    max_pixels: int = DEFAULT_MAX_PIXELS
    exit_timeout_s: int = 30       # drain time on SIGTERM / stop
    log_verbose: int = 0
    verify: bool = True


def python_libdir_first(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Put the running interpreter's LIBDIR first on LD_LIBRARY_PATH (in place; returned).

    Triton's Python-backend stub then links the same libpython as this interpreter instead of
    whichever libpython3.X the system loader finds first.
    """
    env = os.environ if env is None else env
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
    return env


_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")
# A model name is a folder name in Triton's repository and a URL path segment: plain characters,
# starting with a letter or digit (no '.', '..', hidden or option-like names), bounded length.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_model_name(name: str, spec: str = "") -> str:
    """`name` if it is a safe Triton model name, else one ClipfuseError line."""
    from ..limits import MODEL_NAME_CHARS

    if len(name) > MODEL_NAME_CHARS.value:
        raise MODEL_NAME_CHARS.exceeded(len(name), f"model name of {spec or name!r}")
    if not _NAME_RE.fullmatch(name):
        raise ClipfuseError(f"model name {name!r} is not allowed: use letters, digits, '_', '-', '.' "
                            "and start with a letter or digit")
    return name


def parse_artifacts(specs: Sequence[str]) -> List[Tuple[str, Path]]:
    """`PATH` or `NAME=PATH` -> [(model name, path)]; the name defaults to the file's stem.

    An explicit NAME is checked as given (it becomes a folder: `..` would write outside the
    repository); a stem is made safe (odd characters -> '_') and then checked the same way."""
    out: List[Tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = _NAME_OK.sub("_", Path(spec).stem).strip("_.-"), spec
            if not name:
                raise ClipfuseError(f"cannot derive a model name from {spec!r}; use NAME=PATH")
        check_model_name(name, spec)
        if any(name == n for n, _ in out):
            raise ClipfuseError(f"two artifacts would be served as model {name!r}; name them with NAME=PATH")
        out.append((name, Path(path)))
    return out


class ServedModel:
    """One artifact behind a Triton model: a Segmenter and the batch function PyTriton calls.

    Dispatch on the manifest's kind: window graphs (kind "image") run the protocol here with
    windows batched across requests; frame graphs (kind "frame", protocol inside the graph) take
    the frames of concurrent requests in one graph call, up to the window batch, and accept only
    images of their frame size.
    """

    def __init__(self, name: str, artifact: Path, options: ServeOptions) -> None:
        backend_options = {"threads": options.threads} if options.threads else {}
        self.name = name
        self.segmenter = Segmenter.open(artifact, backend=options.backend, batch=options.window_batch,
                                        backend_options=backend_options, verify=options.verify)
        kind = self.segmenter.manifest.get("kind")
        if kind not in SERVED_KINDS:
            raise ClipfuseError(f"{artifact.name}: kind {kind!r} cannot be served (window or frame graphs only)")
        if self.segmenter.dynamic_vocab:
            raise ClipfuseError(f"{artifact.name} has a dynamic vocabulary; serve a graph with baked "
                                "classes (clipfuse export --vocab baked)")
        self.options = options
        self.parameters = model_parameters(self.segmenter.manifest, self.segmenter.protocol, artifact.name)
        self.lock = threading.Lock()
        self.history: List[BatchStats] = []   # bounded: the last 1000 batches

    def infer(self, requests: list) -> List[Dict[str, np.ndarray]]:
        """PyTriton infer function: a list of requests (each image [n, H, W, 3]) -> responses."""
        arrays = [np.asarray(req[INPUT]) for req in requests]
        for arr in arrays:
            check_images(arr, self.options.max_pixels)
        images = [img for arr in arrays for img in arr]
        if self.segmenter.frame_size is not None:
            results, stats = self._frames(images)
        else:
            results, stats = segment_batch(images, self.segmenter.infer_windows, self.segmenter.protocol,
                                           self.segmenter.window, self.segmenter.batch)
        with self.lock:
            self.history = (self.history + [stats])[-1000:]
        responses, start = [], 0
        for arr in arrays:
            chunk = results[start:start + len(arr)]
            start += len(arr)
            responses.append({OUTPUTS[0]: np.stack([r[0] for r in chunk]),
                              OUTPUTS[1]: np.stack([r[1] for r in chunk])})
        return responses

    def _frames(self, images: List[np.ndarray]) -> Tuple[List[Tuple[np.ndarray, np.ndarray]], BatchStats]:
        """Frame graph: all requests' frames through the graph, `segmenter.batch` frames a call."""
        frames = np.stack(images) if len({img.shape for img in images}) == 1 else None
        if frames is None:
            raise ClipfuseError("frames of one batch differ in size")
        step = self.segmenter.batch or len(frames)
        results: List[Tuple[np.ndarray, np.ndarray]] = []
        for i in range(0, len(frames), step):
            out = self.segmenter.segment_frames(frames[i:i + step])
            results.extend(zip(out["labels"], out["confidence"]))
        calls = -(-len(frames) // step)
        return results, BatchStats(images=len(frames), windows=len(frames), backend_calls=calls,
                                   largest_call=min(step, len(frames)))

    def close(self) -> None:
        self.segmenter.close()


def _import_pytriton():
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise ClipfuseError(f"serving needs nvidia-pytriton: pip install 'clipfuse[serve]' ({exc})") from None
    return Triton, TritonConfig, ModelConfig, DynamicBatcher, Tensor


def _as_triton_error(infer: Callable) -> Callable:
    """Bad input -> a PyTriton error (the client gets a Triton error; the server goes on)."""
    from pytriton.exceptions import PyTritonBadParameterError

    def wrapped(requests):
        try:
            return infer(requests)
        except ClipfuseError as exc:
            raise PyTritonBadParameterError(str(exc)) from None
    return wrapped


class ClipfuseTriton:
    """The server: `start()` (returns once models are ready), `serve_forever()`, `stop()`."""

    def __init__(self, artifacts: Sequence[str], options: Optional[ServeOptions] = None) -> None:
        self.options = options or ServeOptions()
        Triton, TritonConfig, ModelConfig, DynamicBatcher, Tensor = _import_pytriton()
        python_libdir_first()
        o = self.options
        if o.instances < 1 or o.max_batch_size < 1:
            raise ClipfuseError("--instances and --max-batch-size must be >= 1")
        for what, port in (("HTTP", o.http_port), ("gRPC", o.grpc_port), ("metrics", o.metrics_port)):
            _check_port_free(o.host, port, what)
        self.models: Dict[str, ServedModel] = {}
        for name, path in parse_artifacts(artifacts):
            self.models[name] = ServedModel(name, path, o)
        config = TritonConfig(http_address=o.host, grpc_address=o.host, metrics_address=o.host,
                              http_port=o.http_port, grpc_port=o.grpc_port, metrics_port=o.metrics_port,
                              exit_timeout_secs=o.exit_timeout_s, log_verbose=o.log_verbose,
                              strict_readiness=True)
        self.triton = Triton(config=config)
        for name, model in self.models.items():
            self.triton.bind(
                model_name=name,
                # one wrapper per instance: PyTriton keys its per-instance state by function
                infer_func=[_as_triton_error(model.infer) for _ in range(o.instances)],
                inputs=[Tensor(name=INPUT, dtype=np.uint8, shape=(-1, -1, 3))],
                outputs=[Tensor(name=OUTPUTS[0], dtype=np.int32, shape=(-1, -1)),
                         Tensor(name=OUTPUTS[1], dtype=np.float32, shape=(-1, -1))],
                config=ModelConfig(max_batch_size=o.max_batch_size,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=o.queue_delay_us)),
                strict=True,
            )
            _add_config_parameters(self.triton, name, model.parameters)

    @property
    def access_token(self) -> Optional[str]:
        """Token for the endpoints PyTriton protects (statistics, repository control)."""
        return self.triton.get_access_token()

    def start(self) -> "ClipfuseTriton":
        try:
            self.triton.run()
        except Exception as exc:  # PyTriton's startup errors are timeouts and its own types
            try:
                self.stop()
            except Exception:
                self.close()
            raise ClipfuseError(f"Triton did not start: {type(exc).__name__}: {exc} "
                                "(--log-verbose 1 shows the server's log)") from None
        return self

    def serve_forever(self) -> None:
        """Block until SIGTERM/SIGINT or the server dies, then drain and stop."""
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            self.triton.serve()  # PyTriton stops (and Triton drains) on KeyboardInterrupt
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.close()

    def stop(self) -> None:
        self.triton.stop()
        self.close()

    def close(self) -> None:
        for model in self.models.values():
            model.close()

    def __enter__(self) -> "ClipfuseTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _check_port_free(host: str, port: int, what: str) -> None:
    """A taken port makes tritonserver exit and PyTriton wait for it: say so at once instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ClipfuseError(f"cannot listen on {host}:{port} for {what} ({exc.strerror}); "
                                f"choose another --{what.lower()}-port") from None


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _add_config_parameters(triton, name: str, parameters: Dict[str, str]) -> None:
    """Put `parameters` into the model's Triton config (`parameters` map, read by clients with
    get_model_config). PyTriton 0.7's public ModelConfig has no field for them; its model keeps
    the generated config in TritonModelConfig.backend_parameters, which becomes that map."""
    for model in triton._model_manager.models:
        if model.model_name == name:
            model._get_triton_model_config().backend_parameters.update(parameters)
            return
    raise ClipfuseError(f"model {name!r} was not bound")
