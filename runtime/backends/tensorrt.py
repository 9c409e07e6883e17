"""TensorRT engine backend (both flavours): tensor I/O API + cuda-python device buffers.

Runs engines of enterprise TensorRT (10.x/11.x) and of TensorRT for RTX, whichever built the
engine (its manifest's engine.flavour). One CUDA stream; device buffers allocated once at the
profile's max shapes; host outputs preallocated per batch size; optional CUDA-graph replay per
batch size (`cuda_graph=True`). TensorRT for RTX JIT-specialises the engine on first use and keeps
the kernels in a runtime cache, persisted beside the engine (NAME.runtime.cache). Refuses an
engine of another flavour, release or GPU with one line before TensorRT does (its own error is a
None from deserialize_cuda_engine and a log line).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .. import trt_support
from ..errors import ClipfuseError
from ..manifest import Manifest, parse_manifest
from .base import Backend


def engine_flavour(manifest: "Manifest | dict") -> str:
    """The flavour that built the engine (manifests before flavours existed: enterprise TensorRT)."""
    eng = parse_manifest(manifest).engine
    return str(eng.flavour or "tensorrt") if eng is not None else "tensorrt"


def check_engine_target(manifest: "Manifest | dict", flavour: str, trt_version: str, sm: Optional[str],
                        artifact: Path) -> None:
    """One-line refusal when the engine was built by another flavour or release, or for another GPU."""
    eng = parse_manifest(manifest, artifact.name).engine
    if eng is None:
        raise ClipfuseError(f"{artifact.name}: manifest has no 'engine' section; build engines with `clipfuse build`")
    built_flavour = str(eng.flavour or "tensorrt")
    built_trt = str("?" if eng.tensorrt_version is None else eng.tensorrt_version)
    targets = [str(t) for t in eng.targets or ([eng.sm] if eng.sm else [])]
    if built_flavour != flavour:
        raise ClipfuseError(f"{artifact.name} was built by {trt_support.flavour(built_flavour).label}, this backend "
                            f"runs {trt_support.flavour(flavour).label}: rebuild with clipfuse build --trt {flavour}")
    reason = trt_support.cannot_run_reason(built_flavour, sm) if sm is not None else None
    if reason:
        raise ClipfuseError(f"{artifact.name}: {reason}")
    if trt_support.short_version(built_trt) != trt_support.short_version(trt_version):
        label = trt_support.flavour(flavour).label
        raise ClipfuseError(f"{artifact.name} was built with {label} {built_trt}, this machine has {trt_version}: "
                            f"rebuild the engine here (clipfuse build, or the command in its manifest)")
    if sm is not None and targets and str(sm) not in targets:
        raise ClipfuseError(f"{artifact.name} was built for GPU SM {', '.join(targets)} ({eng.gpu_name or '?'}), "
                            f"this GPU is SM {sm}: engines are not portable across GPU architectures; rebuild here")


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, artifact: Path, manifest: dict, **options) -> None:
        super().__init__(artifact, manifest, **options)
        self.flavour = engine_flavour(manifest)
        self._check_target(int(options.get("device", 0)))
        self._deserialize()
        self._allocate()
        self._use_graph = bool(options.get("cuda_graph", False))

    # -- opening: check (one line before TensorRT is touched), deserialize, allocate --------------
    def _check_target(self, device: int) -> None:
        """Refuse an engine this machine cannot run (no GPU, flavour/release/SM mismatch, no
        cuda-python) with one line; then import TensorRT and make `device` current."""
        sm = trt_support.device_sm(device)
        if sm is None:
            raise ClipfuseError("no CUDA GPU visible: TensorRT engines need one (run the ONNX graph with "
                                "--backend ort-cpu or openvino here)")
        # before importing anything: on a GPU this flavour does not serve, say what serves it
        reason = trt_support.cannot_run_reason(self.flavour, sm)
        if reason:
            raise ClipfuseError(f"{self.artifact.name}: {reason}")
        trt = trt_support.import_trt(self.flavour)
        try:
            self._cudart = trt_support.import_cudart()
        except ImportError:
            raise ClipfuseError("the tensorrt backend needs cuda-python (pip install cuda-python)") from None
        check_engine_target(self.manifest, self.flavour, trt.__version__, sm, self.artifact)
        self._trt = trt
        self._check(self._cudart.cudaSetDevice(device))

    def _deserialize(self) -> None:
        """Engine (its I/O checked against the manifest's contract) and one execution context; RTX:
        with the runtime cache beside the engine, so JIT-compiled kernels survive the process."""
        trt = self._trt
        self._logger = trt_support.make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.artifact.read_bytes())
        if self.engine is None:
            raise ClipfuseError(f"TensorRT could not deserialize {self.artifact.name}: {self._logger.tail()}")
        # the engine must honour the graph contract the protocol relies on
        trt_support.check_io_contract(trt_support.engine_io(trt, self.engine), self.manifest, self.artifact.name)
        self._runtime_cache = None
        if self.flavour == "rtx":
            self._cache_path = self.artifact.with_suffix(".runtime.cache")
            runtime_config = self.engine.create_runtime_config()
            cache = runtime_config.create_runtime_cache()
            if self._cache_path.is_file():
                cache.deserialize(self._cache_path.read_bytes())
            runtime_config.set_runtime_cache(cache)
            self._runtime_cache = cache
            self.context = self.engine.create_execution_context(runtime_config)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ClipfuseError(f"TensorRT could not create an execution context for {self.artifact.name}: "
                                f"{self._logger.tail()}")

    def _allocate(self) -> None:
        """One stream; device buffers at the profile's max shapes, so their addresses never change
        (what CUDA graphs need); `max_batch` from the profile."""
        trt = self._trt
        (self._stream,) = self._check(self._cudart.cudaStreamCreate())
        self.inputs: List[str] = []
        self.outputs: List[str] = []
        self._dtype: Dict[str, np.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
            self._dtype[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
        image = "image" if "image" in self.inputs else self.inputs[0]
        self._max_shapes = {n: tuple(self.engine.get_tensor_profile_shape(n, 0)[2]) for n in self.inputs}
        self.max_batch = int(self._max_shapes[image][0])
        for n, shape in self._max_shapes.items():
            self.context.set_input_shape(n, shape)
        self._device: Dict[str, int] = {}
        for name in self.inputs + self.outputs:
            shape = self.context.get_tensor_shape(name)
            nbytes = int(np.prod(list(shape))) * self._dtype[name].itemsize
            (ptr,) = self._check(self._cudart.cudaMalloc(max(nbytes, 1)))
            self._device[name] = int(ptr)
            self.context.set_tensor_address(name, int(ptr))
        self._host_out: Dict[tuple, Dict[str, np.ndarray]] = {}
        self._graphs: Dict[tuple, object] = {}

    def _check(self, result):
        return trt_support.cuda_check(result, "the tensorrt backend")

    # -- the timing interface (base.Backend): stage, re-launch on resident buffers, sync ----------
    def stage(self, feeds: Dict[str, np.ndarray]) -> None:
        """One full run puts `feeds` in the device buffers, sets the shapes and (with cuda_graph)
        captures the graph; `launch` then re-executes on the resident buffers only."""
        self.run(feeds)
        self._staged = {n: np.shape(v) for n, v in feeds.items()}

    def launch(self, feeds_like: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Enqueue one more execution for the shapes staged (or those of `feeds_like`) on the
        buffers the last `run` of those shapes filled (no copies); pair with `synchronize`."""
        shapes = self._staged if feeds_like is None else {n: np.shape(v) for n, v in feeds_like.items()}
        key = tuple((n, tuple(shapes[n])) for n in self.inputs)
        for n, shape in key:
            self.context.set_input_shape(n, shape)
        self._execute(key)

    def synchronize(self) -> None:
        self._check(self._cudart.cudaStreamSynchronize(self._stream))

    def device_memory_bytes(self) -> Optional[int]:
        """Bytes in use on the device (device-wide, this engine's share included)."""
        return trt_support.device_memory_in_use()

    # -- inference ----------------------------------------------------------------------------
    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        cudart = self._cudart
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ClipfuseError(f"missing input(s) {', '.join(missing)} for {self.artifact.name}")
        arrays = {n: np.ascontiguousarray(feeds[n], dtype=self._dtype[n]) for n in self.inputs}
        for n, a in arrays.items():
            limit = self._max_shapes[n]
            if any(d > m for d, m in zip(a.shape, limit)):
                raise ClipfuseError(f"input {n} shape {list(a.shape)} exceeds the engine profile max "
                                    f"{list(limit)}; split the batch (max_batch={self.max_batch})")
        key = tuple((n, tuple(a.shape)) for n, a in arrays.items())
        for n, a in arrays.items():
            self.context.set_input_shape(n, a.shape)
            self._check(cudart.cudaMemcpyAsync(self._device[n], a.ctypes.data, a.nbytes,
                                               cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
        outs = self._host_out.get(key)
        if outs is None:
            outs = {n: np.empty(tuple(self.context.get_tensor_shape(n)), self._dtype[n]) for n in self.outputs}
            self._host_out[key] = outs
        self._execute(key)
        for n, host in outs.items():
            self._check(cudart.cudaMemcpyAsync(host.ctypes.data, self._device[n], host.nbytes,
                                               cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        self._check(cudart.cudaStreamSynchronize(self._stream))
        # copies: the preallocated host buffers are reused by the next call of this shape
        return {n: host.copy() for n, host in outs.items()}

    def _execute(self, key: tuple) -> None:
        cudart = self._cudart
        if not self._use_graph:
            if not self.context.execute_async_v3(self._stream):
                raise ClipfuseError("TensorRT execute_async_v3 failed")
            return
        graph_exec = self._graphs.get(key)
        if graph_exec is None:
            # one plain launch first: TensorRT finishes shape-dependent setup outside the capture
            if not self.context.execute_async_v3(self._stream):
                raise ClipfuseError("TensorRT execute_async_v3 failed")
            self._check(cudart.cudaStreamBeginCapture(
                self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
            self.context.execute_async_v3(self._stream)
            (graph,) = self._check(cudart.cudaStreamEndCapture(self._stream))
            (graph_exec,) = self._check(cudart.cudaGraphInstantiate(graph, 0))
            self._graphs[key] = graph_exec
        self._check(cudart.cudaGraphLaunch(graph_exec, self._stream))

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        cache = getattr(self, "_runtime_cache", None)
        if cache is not None:
            try:
                from ..fileio import write_bytes_atomic
                write_bytes_atomic(self._cache_path, bytes(cache.serialize()))
            except Exception:
                pass  # a cache is an optimisation; never fail a run over it
            self._runtime_cache = None
        for ge in getattr(self, "_graphs", {}).values():
            cudart.cudaGraphExecDestroy(ge)
        for ptr in getattr(self, "_device", {}).values():
            cudart.cudaFree(ptr)
        self._device = {}
        self._graphs = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
