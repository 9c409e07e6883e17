"""TensorRT engine backend: tensor I/O API (TensorRT 10/11) + cuda-python device buffers.

One CUDA stream; device buffers allocated once at the profile's max shapes; host outputs
preallocated per batch size; optional CUDA-graph replay per batch size (`cuda_graph=True`).
Refuses an engine built for another TensorRT version or GPU SM before TensorRT does (its own
error is a None from deserialize_cuda_engine and a log line).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import ClipfuseError
from .base import Backend


def _short(version: str) -> str:
    parts = str(version).split(".")
    return ".".join(parts[:2])


def check_engine_target(manifest: dict, trt_version: str, sm: Optional[str], artifact: Path) -> None:
    """One-line refusal when the engine was built for another TensorRT release or GPU SM."""
    eng = manifest.get("engine")
    if not isinstance(eng, dict):
        raise ClipfuseError(f"{artifact.name}: manifest has no 'engine' section; build engines with `clipfuse build`")
    built_trt, built_sm = str(eng.get("tensorrt_version", "?")), str(eng.get("sm", "?"))
    if _short(built_trt) != _short(trt_version):
        raise ClipfuseError(f"{artifact.name} was built with TensorRT {built_trt}, this machine has {trt_version}: "
                            "rebuild the engine here (clipfuse build, or the trtexec line in its manifest)")
    if sm is not None and built_sm != str(sm):
        raise ClipfuseError(f"{artifact.name} was built for GPU SM {built_sm} ({eng.get('gpu_name') or '?'}), "
                            f"this GPU is SM {sm}: engines are not portable across GPU architectures; rebuild here")


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, artifact: Path, manifest: dict, **options) -> None:
        super().__init__(artifact, manifest, **options)
        try:
            import tensorrt as trt  # type: ignore
        except Exception as exc:
            raise ClipfuseError(f"the tensorrt backend needs TensorRT ({type(exc).__name__}: {exc}); "
                                "run the .onnx with --backend ort-cpu/ort-cuda instead") from None
        from ..doctor import gpu_info, import_cudart
        try:
            self._cudart = import_cudart()
        except ImportError:
            raise ClipfuseError("the tensorrt backend needs cuda-python (pip install cuda-python)") from None
        device = int(options.get("device", 0))
        gpu = gpu_info(device)
        if gpu is None:
            raise ClipfuseError("no CUDA GPU visible: TensorRT engines need one")
        check_engine_target(manifest, trt.__version__, gpu.sm, self.artifact)
        self._trt = trt
        self._log: List[str] = []
        self._check(self._cudart.cudaSetDevice(device))

        logger = self._make_logger(trt)
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.artifact.read_bytes())
        if self.engine is None:
            tail = " | ".join(self._log[-3:]) or "no TensorRT log"
            raise ClipfuseError(f"TensorRT could not deserialize {self.artifact.name}: {tail}")
        self.context = self.engine.create_execution_context()
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

        # Device buffers at the max profile shapes: fixed addresses (what CUDA graphs need).
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
        self._use_graph = bool(options.get("cuda_graph", False))

    # -- cuda-python helpers ------------------------------------------------------------------
    def _check(self, result):
        err, rest = result[0], result[1:]
        if int(err) != 0:
            raise ClipfuseError(f"CUDA error {getattr(err, 'name', int(err))} in the tensorrt backend")
        return rest

    def _make_logger(self, trt):
        sink = self._log

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                sink.append(msg)
                if int(severity) <= int(trt.ILogger.Severity.WARNING):
                    print(f"tensorrt: {msg}", file=sys.stderr)

        return Logger()

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
        key = tuple((n, a.shape) for n, a in arrays.items())
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
        for ge in getattr(self, "_graphs", {}).values():
            cudart.cudaGraphExecDestroy(ge)
        for ptr in getattr(self, "_device", {}).values():
            cudart.cudaFree(ptr)
        self._device = {}
        self._graphs = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
