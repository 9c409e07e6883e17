"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers behind base.Backend.

Backend names pick the provider chain:
  ort-cpu   CPUExecutionProvider
  ort-cuda  CUDAExecutionProvider (+ CPU for the ops CUDA lacks); IOBinding, outputs stay on device
  ort-trt   TensorrtExecutionProvider (FP16 if asked, engine + timing cache beside the .onnx,
            batch profile from the options) -> CUDA -> CPU; IOBinding
GPU providers need the onnxruntime-gpu wheel INSTEAD of onnxruntime; a missing provider is a clear
error, never a silent fall-back to CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import ClipfuseError
from ..manifest import Manifest, parse_manifest
from .base import Backend

_PROVIDER = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise ClipfuseError("ONNX Runtime is not installed: pip install 'clipfuse[ort]' "
                            "(or onnxruntime-gpu on a CUDA machine)") from None
    return onnxruntime


def _profile_shapes(manifest: "Manifest | dict", batch_profile: List[int]) -> Dict[str, str]:
    """trt_profile_{min,opt,max}_shapes strings: batch varies, everything else as exported."""
    out = {}
    for key, batch in zip(("min", "opt", "max"), batch_profile):
        parts = []
        for spec in parse_manifest(manifest).inputs:
            dims = [str(batch) if d == "batch" else str(d) for d in spec.shape]
            if any(not d.isdigit() for d in dims):
                continue  # other symbolic dims (class_embeddings' K) are left to ORT
            parts.append(f"{spec.name}:{'x'.join(dims)}")
        out[f"trt_profile_{key}_shapes"] = ",".join(parts)
    return out


def provider_chain(backend: str, artifact: Path, manifest: dict, options: dict) -> list:
    """The providers list (with options) ONNX Runtime gets for backend name `backend`."""
    cuda_opts = {
        "device_id": int(options.get("device_id", 0)),
        # EXHAUSTIVE benchmarks conv algorithms once per shape; ViTs have one conv (patch embed).
        "cudnn_conv_algo_search": options.get("cudnn_conv_algo_search", "EXHAUSTIVE"),
    }
    if options.get("cuda_graph"):
        cuda_opts["enable_cuda_graph"] = "1"
    if backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    if backend == "ort-cuda":
        return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
    cache_dir = Path(options.get("trt_cache_dir") or artifact.parent / f"{artifact.stem}.ort-trt-cache")
    trt_opts = {
        "device_id": cuda_opts["device_id"],
        "trt_fp16_enable": bool(options.get("fp16", False)),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
    }
    profile = options.get("batch_profile")
    if profile:
        trt_opts.update(_profile_shapes(manifest, [int(b) for b in profile]))
    return [("TensorrtExecutionProvider", trt_opts), ("CUDAExecutionProvider", cuda_opts),
            "CPUExecutionProvider"]


class OrtBackend(Backend):
    """One InferenceSession over the exported graph. Options: threads, device_id, fp16,
    batch_profile [min,opt,max], trt_cache_dir, cuda_graph, cudnn_conv_algo_search."""

    def __init__(self, artifact: Path, manifest: dict, backend: str = "ort-cpu", **options) -> None:
        super().__init__(artifact, manifest, **options)
        if backend not in _PROVIDER:
            raise ClipfuseError(f"OrtBackend does not know backend {backend!r}")
        self.name = backend
        ort = _import_ort()
        wanted = _PROVIDER[backend]
        available = ort.get_available_providers()
        if wanted not in available:
            hint = " (install onnxruntime-gpu instead of onnxruntime)" if backend != "ort-cpu" else ""
            raise ClipfuseError(f"backend {backend!r} needs ONNX Runtime's {wanted}, which this "
                                f"onnxruntime {ort.__version__} lacks{hint}; available: {', '.join(available)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.get("threads"):
            so.intra_op_num_threads = int(options["threads"])
        so.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
        extra = {}
        if backend == "ort-cpu" and self.meta.is_fp16:
            # ONNX Runtime 1.32's CPU NchwcTransformer segfaults while loading FP16 CLIP graphs;
            # every other optimisation stays on.
            extra["disabled_optimizers"] = ["NchwcTransformer"]
        try:
            self.session = ort.InferenceSession(str(artifact), sess_options=so,
                                                providers=provider_chain(backend, self.artifact, manifest, options),
                                                **extra)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClipfuseError(f"ONNX Runtime cannot load {artifact.name}: {first}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.on_gpu = backend != "ort-cpu"
        self.device_id = int(options.get("device_id", 0))
        profile = options.get("batch_profile")
        self.max_batch: Optional[int] = int(profile[2]) if profile else None

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ClipfuseError(f"{self.artifact.name} needs input(s) {', '.join(missing)}")
        feeds = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        if not self.on_gpu:
            outs = self.session.run(self.output_names, feeds)
            return dict(zip(self.output_names, outs))
        # IOBinding: inputs copied once, outputs allocated on the device by ORT, one copy back.
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        outs = binding.copy_outputs_to_cpu()
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None
