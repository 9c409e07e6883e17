"""ONNX Runtime on NVIDIA GPUs: the CUDA execution provider (`ort-cuda`) and the TensorRT EP
(`ort-trt`), with device-resident I/O and CUDA-graph replay.

This is the GPU path that runs wherever onnxruntime-gpu has a CUDA build for the driver: Hopper
(H100/H200), data-centre Blackwell, RTX cards and Jetson (JetPack's onnxruntime-gpu), on the same
.onnx graphs as the CPU (FP32, or the FP16 graph NAME.fp16.onnx that `clipfuse build` writes).

* I/O: one IOBinding per input-shape signature, its input and output OrtValues allocated once on
  the device; a call copies the host arrays into the resident inputs (OrtValue.update_inplace),
  runs, and copies the outputs back once. Output shapes come from the manifest's symbolic dims
  bound by the inputs; a shape the manifest cannot resolve is left to ONNX Runtime to allocate.
* CUDA graphs (`cuda_graph=True`, provider option enable_cuda_graph; TensorRT EP:
  trt_cuda_graph_enable): ONNX Runtime captures the first runs of a binding and replays them;
  every shape signature gets its own graph (run option gpu_graph_id), up to MAX_GRAPHS; the
  buffers of a captured graph are never freed or moved. A graph whose nodes do not all run on
  the GPU cannot be captured: the session then opens without graphs and `notes` says so.
* TensorRT EP (`ort-trt`): needs the TensorRT libraries (libnvinfer) loadable; engines and timing
  cache in NAME.ort-trt-cache/ beside the graph; `fp16=True` lets it build FP16 kernels from an
  FP32 graph; `batch_profile=[min, opt, max]`.

onnxruntime-gpu replaces onnxruntime (`pip install 'clipfuse[gpu]'`): both installed shadow each
other's files. ONNX Runtime silently falls back to the CPU when its CUDA libraries do not load;
here that is an error.
"""
from __future__ import annotations

import ctypes
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ClipfuseError
from ..manifest import Manifest, TensorSpec, parse_manifest
from .base import Backend
from .onnxruntime import _import_ort, provider_chain

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
_WANTED = {"ort-cuda": CUDA_EP, "ort-trt": TRT_EP}
# distinct input-shape signatures kept with resident buffers (and, with CUDA graphs, a graph each)
MAX_GRAPHS = 8
INSTALL = "install onnxruntime-gpu instead of onnxruntime (pip install 'clipfuse[gpu]'; never both)"
_TRT_LIBS = ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so.8", "nvinfer_10.dll")


def tensorrt_libraries() -> Optional[str]:
    """The TensorRT core library the TensorRT EP needs, loaded; None when none loads here."""
    for name in _TRT_LIBS:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            pass
    try:  # NVIDIA's pip wheels keep the libraries in the tensorrt_libs package, off the loader path
        import tensorrt_libs  # type: ignore
        for lib in sorted(Path(tensorrt_libs.__file__).parent.glob("libnvinfer.so.*")):
            ctypes.CDLL(str(lib))
            return str(lib)
    except Exception:
        pass
    return None


def unavailable_reason(backend: str = "ort-cuda", ort: Any = None, sm: Any = "probe") -> Optional[str]:
    """None when `backend` can run here, else why not (one line; the skip reason of the GPU tests)."""
    if ort is None:
        try:
            ort = _import_ort()
        except ClipfuseError:
            return f"onnxruntime is not installed: {INSTALL}"
    providers = list(ort.get_available_providers())
    wanted = _WANTED[backend]
    if wanted not in providers:
        build = "the CPU build" if CUDA_EP not in providers else "a build without it"
        return (f"onnxruntime {ort.__version__} has no {wanted} ({build}; providers: {', '.join(providers)}): "
                + (INSTALL if CUDA_EP not in providers else "use ort-cuda, or an onnxruntime-gpu built with TensorRT"))
    if sm == "probe":
        from .. import trt_support
        sm = trt_support.device_sm()
    if sm is None:
        return "no CUDA GPU visible (cuda-python / nvidia-smi): ONNX Runtime's CUDA EP needs one"
    if backend == "ort-trt" and tensorrt_libraries() is None:
        return ("ONNX Runtime's TensorRT EP needs the TensorRT libraries (libnvinfer), which do not load here: "
                "install TensorRT, or use --backend ort-cuda")
    return None


def open_session(create: Callable[[list], Any], with_graph: Optional[list], plain: list) -> Tuple[Any, bool, List[str]]:
    """(session, graph on, notes): `create(providers)` with the CUDA-graph providers first; ONNX
    Runtime refuses graphs when some nodes fall to the CPU EP: then the plain providers."""
    notes: List[str] = []
    if with_graph is not None:
        try:
            return create(with_graph), True, notes
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "graph" not in text.lower():
                raise
            notes.append(f"CUDA graph off (ONNX Runtime: {text[:300]})")
    return create(plain), False, notes


def bind_symbols(specs: Sequence[TensorSpec], shapes: Dict[str, tuple]) -> Dict[str, int]:
    """Symbolic dims of the manifest's inputs ("batch", "classes", ...) -> their sizes in `shapes`."""
    sizes: Dict[str, int] = {}
    for spec in specs:
        shape = shapes.get(spec.name)
        if shape is None or len(shape) != len(spec.shape):
            continue
        for dim, size in zip(spec.shape, shape):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(size))
    return sizes


def output_shapes(manifest: "Manifest | dict", shapes: Dict[str, tuple]) -> Dict[str, Optional[tuple]]:
    """Each output's shape for these input shapes, or None where a dim is not bound by an input."""
    meta = parse_manifest(manifest)
    sizes = bind_symbols(meta.inputs, shapes)
    out: Dict[str, Optional[tuple]] = {}
    for spec in meta.outputs:
        dims = [sizes.get(d) if isinstance(d, str) else int(d) for d in spec.shape]
        out[spec.name] = None if any(d is None for d in dims) else tuple(dims)
    return out


class _Slot:
    """Resident buffers (and CUDA graph) of one input-shape signature."""

    def __init__(self, binding, inputs: Dict[str, Any], outputs: Dict[str, Any], run_options, graph_id: int) -> None:
        self.binding, self.inputs, self.outputs = binding, inputs, outputs
        self.run_options, self.graph_id = run_options, graph_id


class OrtCudaBackend(Backend):
    """Options: device_id, cuda_graph, fp16 + batch_profile + trt_cache_dir (ort-trt),
    cudnn_conv_algo_search, threads (the CPU EP's share)."""

    device_type = "cuda"     # OrtValue device; the CPU tests of the binding logic use "cpu"

    def __init__(self, artifact: Path, manifest: dict, backend: str = "ort-cuda", **options) -> None:
        super().__init__(artifact, manifest, **options)
        if backend not in _WANTED:
            raise ClipfuseError(f"OrtCudaBackend does not know backend {backend!r}")
        self.name = backend
        if backend == "ort-trt" and options.get("fp16"):
            self.precision = "fp16"    # the TensorRT EP builds FP16 kernels from the FP32 graph
        self.device_id = int(options.get("device_id", 0))
        self.notes: List[str] = []
        ort = self._ort = _import_ort()
        self._check_available(ort)
        if hasattr(ort, "preload_dlls") and self.device_type == "cuda":
            try:  # CUDA/cuDNN from the nvidia-* wheels (torch's), as ONNX Runtime documents
                ort.preload_dlls()
            except Exception:
                pass
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if options.get("threads"):
            so.intra_op_num_threads = int(options["threads"])

        def create(providers):
            return ort.InferenceSession(str(self.artifact), sess_options=so, providers=providers)

        want_graph = bool(options.get("cuda_graph", False))
        try:
            self.session, self.cuda_graph, notes = open_session(
                create, self._providers(dict(options, cuda_graph=True)) if want_graph else None,
                self._providers(dict(options, cuda_graph=False)))
        except ClipfuseError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClipfuseError(f"ONNX Runtime cannot load {self.artifact.name} on {backend}: {first}") from None
        self.notes += notes
        self._check_providers_loaded()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._in_dtype = {i.name: _np_dtype(i.type) for i in self.session.get_inputs()}
        self._out_dtype = {o.name: _np_dtype(o.type) for o in self.session.get_outputs()}
        profile = options.get("batch_profile")
        self.max_batch: Optional[int] = int(profile[2]) if profile else None
        self._slots: "OrderedDict[tuple, _Slot]" = OrderedDict()
        self._next_graph_id = 0
        self._staged: Optional[_Slot] = None

    # -- what the provider chain is ---------------------------------------------------------------
    def _check_available(self, ort) -> None:
        reason = unavailable_reason(self.name, ort)
        if reason:
            raise ClipfuseError(f"backend {self.name!r} is not usable here: {reason}")

    def _providers(self, options: dict) -> list:
        chain = provider_chain(self.name, self.artifact, self.manifest, options)
        if options.get("cuda_graph") and self.name == "ort-trt":
            trt_name, trt_opts = chain[0]
            chain[0] = (trt_name, dict(trt_opts, trt_cuda_graph_enable=True))
        return chain

    def _check_providers_loaded(self) -> None:
        wanted = _WANTED[self.name]
        got = self.session.get_providers()
        if wanted not in got:
            raise ClipfuseError(f"ONNX Runtime could not load its {wanted} (CUDA / cuDNN{' / TensorRT' if self.name == 'ort-trt' else ''} "
                                f"libraries of its build missing or mismatched?) and would run on {', '.join(got)}; "
                                "`clipfuse doctor` lists the versions")

    # -- resident buffers -------------------------------------------------------------------------
    def _new_slot(self, arrays: Dict[str, np.ndarray], keep: bool) -> _Slot:
        ort = self._ort
        binding = self.session.io_binding()
        inputs = {}
        for name, arr in arrays.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr, self.device_type, self.device_id)
            binding.bind_ortvalue_input(name, value)
            inputs[name] = value
        shapes = output_shapes(self.meta, {n: a.shape for n, a in arrays.items()})
        outputs = {}
        for name in self.output_names:
            shape = shapes.get(name)
            if shape is None:
                binding.bind_output(name, self.device_type, self.device_id)
                continue
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self._out_dtype[name], self.device_type,
                                                              self.device_id)
            binding.bind_ortvalue_output(name, value)
            outputs[name] = value
        graph_id = -1
        if self.cuda_graph and keep and len(outputs) == len(self.output_names):
            graph_id = self._next_graph_id
            self._next_graph_id += 1
        run_options = ort.RunOptions()
        if self.cuda_graph:
            # -1: run without capturing (a shape past MAX_GRAPHS, or outputs ORT must allocate)
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return _Slot(binding, inputs, outputs, run_options, graph_id)

    def stage(self, feeds: Dict[str, np.ndarray]) -> None:
        """Copy `feeds` into the resident device inputs of their shapes (no run); `launch` runs them."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ClipfuseError(f"{self.artifact.name} needs input(s) {', '.join(missing)}")
        arrays = {n: np.ascontiguousarray(feeds[n], dtype=self._in_dtype[n]) for n in self.input_names}
        key = tuple((n, a.shape) for n, a in arrays.items())
        slot = self._slots.get(key)
        if slot is not None:
            for name, arr in arrays.items():
                slot.inputs[name].update_inplace(arr)
            self._slots.move_to_end(key)
        else:
            keep = len(self._slots) < MAX_GRAPHS
            if not keep and not self.cuda_graph:
                self._slots.popitem(last=False)   # no graph holds its addresses: free the oldest
                keep = True
            slot = self._new_slot(arrays, keep)
            if keep:
                self._slots[key] = slot
        self._staged = slot

    def launch(self) -> None:
        """Run the staged inputs (no host copies); pair with `synchronize` or `fetch`."""
        if self._staged is None:
            raise ClipfuseError("nothing staged: call stage(feeds) first")
        self.session.run_with_iobinding(self._staged.binding, self._staged.run_options)

    def synchronize(self) -> None:
        if self._staged is not None:
            self._staged.binding.synchronize_outputs()

    def device_memory_bytes(self) -> Optional[int]:
        if self.device_type != "cuda":
            return None
        from .. import trt_support
        return trt_support.device_memory_in_use()

    def fetch(self) -> Dict[str, np.ndarray]:
        """The last launch's outputs, copied to the host."""
        return dict(zip(self.output_names, self._staged.binding.copy_outputs_to_cpu()))

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        self.stage(feeds)
        self.launch()
        return self.fetch()

    def close(self) -> None:
        self._slots.clear()
        self._staged = None
        self.session = None


def _np_dtype(onnx_type: str) -> np.dtype:
    """'tensor(float16)' -> np.float16."""
    name = onnx_type[len("tensor("):-1] if onnx_type.startswith("tensor(") else onnx_type
    return np.dtype({"float": "float32", "double": "float64"}.get(name, name))
