"""One runner per benchmarked backend, all over the same weights, head, vocabulary and size.

A runner stages a batch where its backend wants it (`prepare`: host array for CPU backends, a
device tensor / bound OrtValue / engine buffer on GPU), then `call` runs ONE graph call on it and
`sync` waits for the result: that is the "model" scope. `infer` (host in, host out) is what the
end-to-end scope and the output check use.

Names: torch-ref (the PyTorch reference of clipfuse.export.reference, the baseline every speed-up
is relative to), torch-fused (clipfuse's fused module), -fp16 (CUDA autocast), torch-compile,
ort-cpu-fp32/-fp16, ort-cuda-fp32/-fp16 (IOBinding) and -fp16-graph (+ CUDA graph), ort-trt-fp32/-fp16 (TensorRT EP),
tensorrt-fp16 (engine) and tensorrt-fp16-graph (engine replayed as a CUDA graph),
openvino-fp32/-bf16 (clipfuse's OpenVINO backend on the CPU, input bound once as a shared tensor).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from clipfuse.runtime.errors import ClipfuseError

REFERENCE = "torch-ref"


class Unavailable(Exception):
    """The backend cannot run on this machine; the message says why (it goes into the report)."""


@dataclass
class BenchContext:
    """What every runner of one (head, size) is built from."""
    build: object                 # clipfuse.export.api.FusedBuild
    onnx_path: Path               # the FP32 graph exported from the same build
    manifest: dict
    workdir: Path
    threads: int
    torch_device: str             # "cpu" or "cuda"
    max_batch: int
    _fp16: Optional[Path] = None
    _fp16_error: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def fp16_onnx(self) -> Path:
        """The FP16 graph, through the build's one path (export.build.fp16_graph: FP32 islands,
        contract, graph checks) with its manifest beside it; converted once and reused."""
        if self._fp16 is None and self._fp16_error is None:
            try:
                from clipfuse.export.build import fp16_graph
                from clipfuse.runtime.manifest import manifest_path_for, write_manifest
            except ImportError as exc:
                self._fp16_error = f"FP16 converter not importable: {exc}"
            else:
                try:
                    dst, manifest = fp16_graph(self.onnx_path, self.manifest, log=self.notes.append)
                    write_manifest(manifest_path_for(dst), manifest)
                    self._fp16 = dst
                except Exception as exc:  # record, do not abort the whole benchmark
                    self._fp16_error = f"FP16 conversion failed: {type(exc).__name__}: {exc}"
        if self._fp16 is None:
            raise Unavailable(self._fp16_error)
        return self._fp16


class Runner:
    name = "?"
    label = "?"
    device = "cpu"
    precision = "fp32"
    event_timer: Optional[Callable] = None

    def prepare(self, images: np.ndarray) -> None:
        raise NotImplementedError

    def call(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        pass

    def infer(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def reset_device_peak(self) -> None:
        pass

    def device_peak_mb(self) -> Optional[float]:
        return None

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------
def _torch():
    import torch
    return torch


class TorchRunner(Runner):
    """Eager (or compiled) torch callable on uint8 NHWC tensors; optional CUDA FP16 autocast."""

    def __init__(self, name: str, label: str, fn: Callable, device: str, fp16: bool = False) -> None:
        torch = _torch()
        self.name, self.label, self.device = name, label, device
        self.precision = "fp16-autocast" if fp16 else "fp32"
        self.fn = fn
        self.fp16 = fp16
        self.on_gpu = device.startswith("cuda")
        self._x = None
        if self.on_gpu:
            from .timing import torch_cuda_event_timer
            self.event_timer = torch_cuda_event_timer(torch)

    def _context(self):
        torch = _torch()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.on_gpu:
            stack.enter_context(torch.device(self.device))  # factories inside the model land on the GPU
        if self.fp16:
            stack.enter_context(torch.autocast(device_type="cuda", dtype=torch.float16))
        return stack

    def prepare(self, images: np.ndarray) -> None:
        self._x = _torch().from_numpy(np.ascontiguousarray(images)).to(self.device)

    def call(self) -> None:
        with self._context():
            self._out = self.fn(self._x)

    def sync(self) -> None:
        if self.on_gpu:
            _torch().cuda.synchronize()

    def infer(self, images: np.ndarray) -> np.ndarray:
        self.prepare(images)
        self.call()
        out = self._out
        return out.float().cpu().numpy() if hasattr(out, "cpu") else np.asarray(out, dtype=np.float32)

    def reset_device_peak(self) -> None:
        if self.on_gpu:
            _torch().cuda.reset_peak_memory_stats()

    def device_peak_mb(self) -> Optional[float]:
        return _torch().cuda.max_memory_allocated() / 2 ** 20 if self.on_gpu else None

    def close(self) -> None:
        self.fn = self._x = self._out = None


def _reference_callable(ctx: BenchContext) -> Callable:
    """ReferenceModel.scores on ctx.torch_device (its tensors moved; factories follow the device)."""
    from clipfuse.export.reference import ReferenceModel
    ref = ReferenceModel.from_build(ctx.build)
    if ctx.torch_device != "cpu":
        dev = ctx.torch_device
        ref.visual.to(dev)
        ref.text = ref.text.to(dev)
        if ref.bias is not None:
            ref.bias = ref.bias.to(dev)
        if ref.conv_heads is not None:
            ref.conv_heads.to(dev)
    return ref.scores


def _fused_module(ctx: BenchContext):
    return ctx.build.module.to(ctx.torch_device).eval()


def _need_gpu(ctx: BenchContext, what: str) -> None:
    if ctx.torch_device == "cpu":
        raise Unavailable(f"{what} needs a CUDA GPU (CPU autocast would be bfloat16, not FP16)")


def _make_torch_ref(ctx):
    return TorchRunner("torch-ref", "PyTorch reference FP32", _reference_callable(ctx), ctx.torch_device)


def _make_torch_fused(ctx):
    return TorchRunner("torch-fused", "clipfuse torch FP32", _fused_module(ctx), ctx.torch_device)


def _make_torch_ref_fp16(ctx):
    _need_gpu(ctx, "FP16 autocast")
    return TorchRunner("torch-ref-fp16", "PyTorch reference FP16 autocast", _reference_callable(ctx),
                       ctx.torch_device, fp16=True)


def _make_torch_fused_fp16(ctx):
    _need_gpu(ctx, "FP16 autocast")
    return TorchRunner("torch-fused-fp16", "clipfuse torch FP16 autocast", _fused_module(ctx), ctx.torch_device,
                       fp16=True)


def _compiled(ctx):
    torch = _torch()
    if not hasattr(torch, "compile"):
        raise Unavailable(f"torch {torch.__version__} has no torch.compile")
    # compilation happens at the first (warm-up) call; a failure there is recorded as "failed"
    return torch.compile(_fused_module(ctx), dynamic=False)


def _make_torch_compile(ctx):
    return TorchRunner("torch-compile", "clipfuse torch.compile FP32", _compiled(ctx), ctx.torch_device)


def _make_torch_compile_fp16(ctx):
    _need_gpu(ctx, "FP16 autocast")
    return TorchRunner("torch-compile-fp16", "clipfuse torch.compile FP16 autocast", _compiled(ctx),
                       ctx.torch_device, fp16=True)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------
class OrtRunner(Runner):
    """clipfuse's OrtBackend; on GPU the staged input is an OrtValue on the device (IOBinding)."""

    def __init__(self, name: str, label: str, path: Path, ctx: BenchContext, provider: str, precision: str,
                 **options) -> None:
        from clipfuse.runtime.backends import open_backend
        self.name, self.label, self.precision = name, label, precision
        self.device = "cpu" if provider == "ort-cpu" else "cuda"
        manifest = dict(ctx.manifest, precision=precision)
        if provider == "ort-cpu":
            options.setdefault("threads", ctx.threads)
        try:
            self.backend = open_backend(path, manifest, provider, **options)
        except ClipfuseError as exc:
            raise Unavailable(str(exc)) from None
        self.session = self.backend.session
        self._feeds: Dict[str, np.ndarray] = {}
        self._binding = None

    def prepare(self, images: np.ndarray) -> None:
        self._feeds = {"image": np.ascontiguousarray(images)}
        if self.device == "cpu":
            return
        # GPU providers: the input copied once into the backend's resident device buffer; a
        # timed call is one run on it (a CUDA-graph replay with cuda_graph)
        self.backend.stage(self._feeds)
        self._binding = True

    def call(self) -> None:
        if self._binding is None:
            self.session.run(self.backend.output_names, self._feeds)
        else:
            self.backend.launch()

    def sync(self) -> None:
        if self._binding is not None:
            self.backend.synchronize()

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.backend.run({"image": images})["scores"]

    def close(self) -> None:
        self.backend.close()
        self.session = self._binding = None


def _make_ort(provider: str, precision: str, **options):
    device = "CPU" if provider == "ort-cpu" else ("CUDA EP" if provider == "ort-cuda" else "TensorRT EP")
    graph = "-graph" if options.get("cuda_graph") else ""

    def make(ctx: BenchContext):
        path = ctx.fp16_onnx() if precision == "fp16" and provider != "ort-trt" else ctx.onnx_path
        opts = dict(options)
        if provider == "ort-trt":
            opts.update(fp16=precision == "fp16", batch_profile=[1, ctx.max_batch, ctx.max_batch],
                        trt_cache_dir=str(ctx.workdir / f"{path.stem}.{precision}.ort-trt-cache"))
        return OrtRunner(f"{provider}-{precision}{graph}",
                         f"ONNX Runtime {device} {precision.upper()}" + (" + CUDA graph" if graph else ""), path, ctx,
                         provider, precision, **opts)
    return make


# ---------------------------------------------------------------------------------------------
# TensorRT engine (needs tensorrt + cuda-python + a GPU; built here with `clipfuse build`)
# ---------------------------------------------------------------------------------------------
class TensorRTRunner(Runner):
    device = "cuda"
    precision = "fp16"

    def __init__(self, name: str, label: str, engine: Path, manifest: dict, cuda_graph: bool) -> None:
        from clipfuse.runtime.backends.tensorrt import TensorRTBackend
        self.name, self.label = name, label
        try:
            self.backend = TensorRTBackend(engine, manifest, cuda_graph=cuda_graph)
        except ClipfuseError as exc:
            raise Unavailable(str(exc)) from None

    def prepare(self, images: np.ndarray) -> None:
        self.backend.stage({"image": np.ascontiguousarray(images, dtype=np.uint8)})

    def call(self) -> None:
        self.backend.launch()

    def sync(self) -> None:
        self.backend.synchronize()

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.backend.run({"image": images})["scores"]

    def device_peak_mb(self) -> Optional[float]:
        try:
            return self.backend.device_memory_in_use() / 2 ** 20  # device-wide, the engine's share included
        except Exception:
            return None

    def close(self) -> None:
        self.backend.close()


def _build_engine(ctx: BenchContext) -> Path:
    """`clipfuse build` (FP16 graph + strongly typed engine) into the work folder, once, with the
    installed flavour whose engines run on this GPU (never an engine that would then be skipped)."""
    found = sorted(ctx.workdir.glob(f"{ctx.onnx_path.stem}*.engine"))
    if found:
        return found[0]
    from clipfuse.export.build import BuildOptions, build
    from clipfuse.export.trt_build import BatchProfile
    from clipfuse.runtime import trt_support
    from clipfuse.runtime.artifact import open_artifact
    sm = trt_support.device_sm()
    if sm is None:
        raise Unavailable("no CUDA GPU visible")
    try:
        flavour = trt_support.choose_for_device(None, sm)
    except ClipfuseError as exc:
        raise Unavailable(str(exc)) from None
    try:
        result = build(ctx.onnx_path, open_artifact(ctx.onnx_path).manifest,
                       BuildOptions(precision="fp16", trt=flavour, batch=BatchProfile(1, ctx.max_batch, ctx.max_batch),
                                    targets=(sm,) if flavour == "rtx" else ()),
                       log=lambda msg: None)
    except ClipfuseError as exc:
        raise Unavailable(f"engine build failed: {exc}") from None
    return result.engine


def _make_tensorrt(cuda_graph: bool):
    def make(ctx: BenchContext):
        engine = _build_engine(ctx)
        from clipfuse.runtime.artifact import open_artifact
        manifest = open_artifact(engine).manifest
        suffix = " + CUDA graph" if cuda_graph else ""
        return TensorRTRunner("tensorrt-fp16" + ("-graph" if cuda_graph else ""), f"TensorRT engine FP16{suffix}",
                              engine, manifest, cuda_graph)
    return make


# ---------------------------------------------------------------------------------------------
# OpenVINO (CPU; needs the openvino extra)
# ---------------------------------------------------------------------------------------------
class OpenVINORunner(Runner):
    """clipfuse's OpenVINOBackend at an explicit precision; the staged batch is bound to the infer
    request as a tensor sharing the host array, so a timed call is one `infer()`."""

    def __init__(self, precision: str, ctx: BenchContext) -> None:
        from clipfuse.runtime.backends import open_backend
        self.name, self.precision = f"openvino-{precision}", precision
        self.label = f"OpenVINO CPU {precision.upper()}"
        try:
            # BF16 is timed for every head; the runtime refuses it for heads whose labels change
            # (BF16_REFUSED), which the report's tables say
            self.backend = open_backend(ctx.onnx_path, ctx.manifest, "openvino", precision=precision,
                                        threads=ctx.threads, device="CPU", allow_refused_bf16=True)
        except ClipfuseError as exc:
            raise Unavailable(str(exc)) from None
        if self.backend.precision != precision:
            raise Unavailable(f"OpenVINO compiled {precision} as {self.backend.precision}")
        self._staged: Optional[np.ndarray] = None

    def prepare(self, images: np.ndarray) -> None:
        import openvino
        self._staged = np.ascontiguousarray(images, dtype=np.uint8)
        self.backend.request.set_tensor("image", openvino.Tensor(self._staged, shared_memory=True))

    def call(self) -> None:
        self.backend.request.infer()

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.backend.run({"image": images})["scores"]

    def close(self) -> None:
        self.backend.close()
        self._staged = None


def _make_openvino(precision: str):
    return lambda ctx: OpenVINORunner(precision, ctx)


# name -> factory(ctx) -> Runner (raises Unavailable with the reason)
FACTORIES: Dict[str, Callable[[BenchContext], Runner]] = {
    "torch-ref": _make_torch_ref,
    "torch-fused": _make_torch_fused,
    "torch-ref-fp16": _make_torch_ref_fp16,
    "torch-fused-fp16": _make_torch_fused_fp16,
    "torch-compile": _make_torch_compile,
    "torch-compile-fp16": _make_torch_compile_fp16,
    "ort-cpu-fp32": _make_ort("ort-cpu", "fp32"),
    "ort-cpu-fp16": _make_ort("ort-cpu", "fp16"),
    "ort-cuda-fp32": _make_ort("ort-cuda", "fp32"),
    "ort-cuda-fp16": _make_ort("ort-cuda", "fp16"),
    "ort-cuda-fp16-graph": _make_ort("ort-cuda", "fp16", cuda_graph=True),
    "ort-trt-fp32": _make_ort("ort-trt", "fp32"),
    "ort-trt-fp16": _make_ort("ort-trt", "fp16"),
    "tensorrt-fp16": _make_tensorrt(False),
    "tensorrt-fp16-graph": _make_tensorrt(True),
    "openvino-fp32": _make_openvino("fp32"),
    "openvino-bf16": _make_openvino("bf16"),
}

# What `--backends cpu` / `gpu` / `all` mean.
CPU_SET = ("torch-ref", "torch-fused", "ort-cpu-fp32", "ort-cpu-fp16")
GPU_SET = ("torch-ref", "torch-fused", "torch-ref-fp16", "torch-fused-fp16", "torch-compile",
           "torch-compile-fp16", "ort-cuda-fp32", "ort-cuda-fp16", "ort-cuda-fp16-graph", "ort-trt-fp16", "tensorrt-fp16",
           "tensorrt-fp16-graph")
OPENVINO_SET = ("openvino-fp32", "openvino-bf16")
BACKEND_SETS = {"cpu": CPU_SET, "gpu": GPU_SET, "openvino": OPENVINO_SET, "all": tuple(FACTORIES)}


def parse_backends(text: str) -> List[str]:
    """Comma list of names and/or sets (cpu, gpu, all); the reference always comes first."""
    names: List[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        for name in BACKEND_SETS.get(item, (item,)):
            if name not in FACTORIES:
                raise ClipfuseError(f"unknown backend {name!r}; choose from: {', '.join(FACTORIES)} "
                                    f"or the sets {', '.join(BACKEND_SETS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise ClipfuseError("--backends is empty")
    if REFERENCE in names:
        names.remove(REFERENCE)
        names.insert(0, REFERENCE)
    return names


def open_runner(name: str, ctx: BenchContext) -> Runner:
    return FACTORIES[name](ctx)
