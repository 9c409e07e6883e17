"""The benchmarked backends: one table from bench names to the runtime's backend registry.

`BENCH_BACKENDS` maps each user-facing bench name (`--backends`, the reports' "backend" column)
to a row: the runtime registry backend that runs it (clipfuse.runtime.backends: ort-cpu, ort-cuda,
ort-trt, tensorrt, openvino), which graph it opens (the exported FP32 graph, the FP16 graph of
export.build.fp16_graph, or the engine of `clipfuse build`, each opened by runtime.artifact with
its own manifest) and the backend options. Every such row is driven through the runner interface
of runtime/backends/base.py only: `stage` once, then `launch` + `synchronize` per timed call (the
"model" scope), `run` for the output check, `device_memory_bytes` for the device peak.

Rows without a registry backend are the PyTorch runners, kept here because no runtime backend
computes them: the reference baseline (clipfuse.export.reference on the in-process build, on
--torch-device; every speed-up is relative to `torch-ref`), clipfuse's fused torch module, CUDA
FP16 autocast and torch.compile. (The registry's `torch` backend rebuilds the reference from the
manifest on the CPU for `clipfuse compare`; the bench reuses the build it exported instead.)

Names: torch-ref, torch-fused, -fp16 (CUDA autocast), torch-compile, ort-cpu-fp32/-fp16,
ort-cuda-fp32/-fp16 (IOBinding) and -fp16-graph (+ CUDA graph), ort-trt-fp32/-fp16 (TensorRT EP),
tensorrt-fp16 (engine) and tensorrt-fp16-graph (engine replayed as a CUDA graph), openvino-fp32/-bf16
(OpenVINO on the CPU, input bound once as a shared tensor).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional

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
    """What the suite times: `prepare` stages a batch, `call` is one timed call, `sync` waits."""
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


def _compiled(ctx):
    torch = _torch()
    if not hasattr(torch, "compile"):
        raise Unavailable(f"torch {torch.__version__} has no torch.compile")
    # compilation happens at the first (warm-up) call; a failure there is recorded as "failed"
    return torch.compile(_fused_module(ctx), dynamic=False)


_TORCH_MODELS = {"reference": _reference_callable, "fused": _fused_module, "compile": _compiled}


def _open_torch_runner(name: str, row: BenchBackend, ctx: BenchContext) -> Runner:
    autocast = bool(row.options.get("autocast"))
    if autocast:
        _need_gpu(ctx, "FP16 autocast")
    return TorchRunner(name, row.label, _TORCH_MODELS[str(row.options["model"])](ctx), ctx.torch_device,
                       fp16=autocast)


# ---------------------------------------------------------------------------------------------
# TensorRT engine (needs tensorrt + cuda-python + a GPU; built here with `clipfuse build`)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchBackend:
    """One row: what a bench name runs.

    backend   runtime registry name, or None for a PyTorch runner of this module
    graph     "fp32" (the exported graph), "fp16" (its FP16 graph), "engine" (`clipfuse build`),
              "torch" (no graph: the in-process build)
    options   backend options (torch rows: model = reference/fused/compile, autocast)
    device    where it computes ("cpu" or "cuda"; torch rows: --torch-device)
    """
    label: str
    backend: Optional[str]
    graph: str
    options: Mapping[str, object]      # read-only (MappingProxyType)
    device: str = "cpu"


def _row(label: str, backend: Optional[str], graph: str, device: str = "cpu", **options) -> BenchBackend:
    return BenchBackend(label, backend, graph, MappingProxyType(options), device)


_OV = dict(device="CPU", allow_refused_bf16=True)   # BF16 is timed for every head; the report says
                                                    # which heads the runtime refuses it for
BENCH_BACKENDS: Dict[str, BenchBackend] = {
    "torch-ref": _row("PyTorch reference FP32", None, "torch", model="reference"),
    "torch-fused": _row("clipfuse torch FP32", None, "torch", model="fused"),
    "torch-ref-fp16": _row("PyTorch reference FP16 autocast", None, "torch", model="reference", autocast=True),
    "torch-fused-fp16": _row("clipfuse torch FP16 autocast", None, "torch", model="fused", autocast=True),
    "torch-compile": _row("clipfuse torch.compile FP32", None, "torch", model="compile"),
    "torch-compile-fp16": _row("clipfuse torch.compile FP16 autocast", None, "torch", model="compile",
                               autocast=True),
    "ort-cpu-fp32": _row("ONNX Runtime CPU FP32", "ort-cpu", "fp32"),
    "ort-cpu-fp16": _row("ONNX Runtime CPU FP16", "ort-cpu", "fp16"),
    "ort-cuda-fp32": _row("ONNX Runtime CUDA EP FP32", "ort-cuda", "fp32", "cuda"),
    "ort-cuda-fp16": _row("ONNX Runtime CUDA EP FP16", "ort-cuda", "fp16", "cuda"),
    "ort-cuda-fp16-graph": _row("ONNX Runtime CUDA EP FP16 + CUDA graph", "ort-cuda", "fp16", "cuda",
                                cuda_graph=True),
    # the TensorRT EP builds its own FP16 kernels from the FP32 graph (fp16=True)
    "ort-trt-fp32": _row("ONNX Runtime TensorRT EP FP32", "ort-trt", "fp32", "cuda"),
    "ort-trt-fp16": _row("ONNX Runtime TensorRT EP FP16", "ort-trt", "fp32", "cuda", fp16=True),
    "tensorrt-fp16": _row("TensorRT engine FP16", "tensorrt", "engine", "cuda"),
    "tensorrt-fp16-graph": _row("TensorRT engine FP16 + CUDA graph", "tensorrt", "engine", "cuda", cuda_graph=True),
    "openvino-fp32": _row("OpenVINO CPU FP32", "openvino", "fp32", precision="fp32", **_OV),
    "openvino-bf16": _row("OpenVINO CPU BF16", "openvino", "fp32", precision="bf16", **_OV),
}
# What `--backends cpu` / `gpu` / `all` mean.
CPU_SET = ("torch-ref", "torch-fused", "ort-cpu-fp32", "ort-cpu-fp16")
GPU_SET = ("torch-ref", "torch-fused", "torch-ref-fp16", "torch-fused-fp16", "torch-compile",
           "torch-compile-fp16", "ort-cuda-fp32", "ort-cuda-fp16", "ort-cuda-fp16-graph", "ort-trt-fp16", "tensorrt-fp16",
           "tensorrt-fp16-graph")
OPENVINO_SET = ("openvino-fp32", "openvino-bf16")
BACKEND_SETS = {"cpu": CPU_SET, "gpu": GPU_SET, "openvino": OPENVINO_SET, "all": tuple(BENCH_BACKENDS)}


# ---------------------------------------------------------------------------------------------
# Registry backends, through the runner interface only
# ---------------------------------------------------------------------------------------------
class BackendRunner(Runner):
    """A runtime backend (runtime/backends/base.py) timed through stage / launch / synchronize."""

    def __init__(self, name: str, row: BenchBackend, backend) -> None:
        self.name, self.label, self.device = name, row.label, row.device
        self.backend = backend
        self.precision = backend.precision      # what computes, from the artifact's own manifest

    def prepare(self, images: np.ndarray) -> None:
        self.backend.stage({"image": np.ascontiguousarray(images)})

    def call(self) -> None:
        self.backend.launch()

    def sync(self) -> None:
        self.backend.synchronize()

    def infer(self, images: np.ndarray) -> np.ndarray:
        return self.backend.run({"image": images})["scores"]

    def device_peak_mb(self) -> Optional[float]:
        used = self.backend.device_memory_bytes()
        return used / 2 ** 20 if used is not None else None

    def close(self) -> None:
        self.backend.close()


def _artifact(row: BenchBackend, ctx: BenchContext) -> Path:
    if row.graph == "fp32":
        return ctx.onnx_path
    if row.graph == "fp16":
        return ctx.fp16_onnx()
    if row.graph == "engine":
        return _build_engine(ctx)
    raise ValueError(f"bench table: unknown graph {row.graph!r}")


def _options(row: BenchBackend, ctx: BenchContext, artifact: Path) -> dict:
    """The row's options + what depends on the run: CPU threads, the TensorRT EP's batch profile
    and cache folder."""
    options = dict(row.options)
    if row.backend in ("ort-cpu", "openvino"):
        options.setdefault("threads", ctx.threads)
    if row.backend == "ort-trt":
        precision = "fp16" if options.get("fp16") else "fp32"
        options.update(batch_profile=[1, ctx.max_batch, ctx.max_batch],
                       trt_cache_dir=str(ctx.workdir / f"{artifact.stem}.{precision}.ort-trt-cache"))
    return options


def _open_registry_runner(name: str, row: BenchBackend, ctx: BenchContext) -> Runner:
    from clipfuse.runtime.artifact import open_artifact
    from clipfuse.runtime.backends import open_backend
    artifact = _artifact(row, ctx)
    try:
        manifest = open_artifact(artifact).manifest   # the artifact's own manifest (FP16 graph: fp16)
        backend = open_backend(artifact, manifest, row.backend, **_options(row, ctx, artifact))
    except ClipfuseError as exc:
        raise Unavailable(str(exc)) from None
    if row.options.get("precision") and backend.precision != row.options["precision"]:
        wanted = row.options["precision"]
        backend.close()
        raise Unavailable(f"{row.backend} compiled {wanted} as {backend.precision}")
    return BackendRunner(name, row, backend)


def parse_backends(text: str) -> List[str]:
    """Comma list of names and/or sets (cpu, gpu, all); the reference always comes first."""
    names: List[str] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        for name in BACKEND_SETS.get(item, (item,)):
            if name not in BENCH_BACKENDS:
                raise ClipfuseError(f"unknown backend {name!r}; choose from: {', '.join(BENCH_BACKENDS)} "
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
    """The runner of bench name `name` (raises Unavailable with the reason)."""
    row = BENCH_BACKENDS[name]
    if row.backend is None:
        return _open_torch_runner(name, row, ctx)
    return _open_registry_runner(name, row, ctx)
