"""OpenVINO backend: clipfuse's ONNX graphs on Intel/AMD CPUs (and Intel GPUs/NPUs) behind base.Backend.

OpenVINO reads the exported .onnx directly; nothing is converted ahead of time. Generic over the
graph's I/O: every input the graph declares is fed by name and every output comes back by name, so
window graphs, frame graphs, dynamic-vocabulary graphs, the text encoder and the refer graphs all
run through the same code.

Precision is an explicit choice, because OpenVINO's CPU default silently computes in BF16 on CPUs
that have it (AVX-512 BF16 / AMX), which changes the numbers:
  fp32  INFERENCE_PRECISION_HINT=f32, matches ONNX Runtime within 1e-5
  bf16  BF16 matmuls/convolutions (refused where the device lacks it, and for heads whose labels
        measurably change, see BF16_REFUSED)
  fp16  for GPU/NPU devices (refused on CPUs that lack it)
  auto  window graphs of a head measured to keep its labels (BF16_ACCEPTED): bf16 where the device
        has it; image graphs on GPU/NPU: fp16; everything else (other heads, frame graphs until
        measured, text and refer graphs, whose embeddings other graphs consume): fp32
The precision the compiled model actually uses is read back from OpenVINO and recorded
(`Backend.precision`), so outputs say what ran.

Compiled models are cached (OpenVINO CACHE_DIR): by default beside the graph in
`<stem>.openvino-cache/<sha256 of the graph, 16 hex>-<precision>/`, or under
~/.cache/clipfuse/openvino when that folder is not writable; the second start then skips
compilation. The precision is part of the folder because OpenVINO's blob key is not: a BF16 compile
that met an FP32 blob of the same graph loaded it and returned NaN scores (OpenVINO 2026.4.1, AMX
CPU; tests/test_backend_openvino.py::test_each_precision_has_its_own_cache_folder).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import ClipfuseError
from ..manifest import Manifest, parse_manifest
from .base import Backend

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# clipfuse name -> (OpenVINO element type name, OPTIMIZATION_CAPABILITIES entry)
_OV_TYPE = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16")}
_FROM_OV = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}

# Heads whose BF16 labels disagree with FP32 beyond the 99.5 % bar on tests/data/street.jpg and two
# smooth photo-like images (min over the three images; OpenVINO 2026.4 on an AVX-512 BF16 AMD EPYC;
# random ViT-B/16 weights with perturbed biases/gains, 21 VOC classes, each head's own protocol;
# benchmarks/results/openvino-bf16-agreement.json; the tiny-ViT numbers are
# tests/test_backend_openvino.py's). `auto` falls back to FP32 for them; an explicit bf16 is refused.
BF16_ACCEPTED = ("naclip",)  # ViT-B/16 min 99.65 %, tiny ViT >= 99.5 %, no NaN/Inf
BF16_REFUSED: Dict[str, str] = {
    "maskclip": "BF16 labels agree with FP32 on only 99.34 % of pixels (ViT-B/16, street.jpg; bar 99.5 %)",
    "sclip": "BF16 labels agree with FP32 on only 99.46 % of pixels (ViT-B/16, smooth 640x480; bar 99.5 %)",
    "clearclip": "BF16 labels agree with FP32 on only 99.41 % of pixels (ViT-B/16, smooth 500x375; bar 99.5 %)",
    "clip-dinoiser": "BF16 flips the background rule and the 0.2 correlation threshold: labels agree on "
                     "99.55 % (ViT-B/16) but only 99.32 % on the tiny test ViT (street.jpg), and "
                     "scores jump by up to 0.92 (bar 99.5 %)",
}


def import_openvino():
    """(openvino, openvino.properties, openvino.properties.hint), or a ClipfuseError."""
    try:
        import openvino
        import openvino.properties as props
        import openvino.properties.hint as hint
    except ImportError:
        raise ClipfuseError("OpenVINO is not installed: pip install 'clipfuse[openvino]'") from None
    return openvino, props, hint


def device_capabilities(core, device: str) -> List[str]:
    """OPTIMIZATION_CAPABILITIES of `device` (e.g. FP32, BF16, FP16, INT8); [] when it cannot say."""
    try:
        return [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]
    except Exception:
        return []


def resolve_precision(requested: str, manifest: "Manifest | dict", capabilities: List[str], device: str,
                      allow_refused: bool = False) -> str:
    """The precision to compile with (fp32/bf16/fp16), or a ClipfuseError saying why not.

    `allow_refused` lets an explicit bf16 through for a refused head: benchmarks time it; never
    for deployment."""
    if requested not in PRECISIONS:
        raise ClipfuseError(f"--precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    meta = parse_manifest(manifest)
    head = meta.head_name
    image_graph = meta.kind in ("image", "frame")
    if requested == "auto":
        if meta.kind == "image" and "BF16" in capabilities and head in BF16_ACCEPTED:
            return "bf16"
        if image_graph and device.split(".")[0] in ("GPU", "NPU") and "FP16" in capabilities:
            return "fp16"
        return "fp32"
    if capabilities and _OV_TYPE[requested][1] not in capabilities:
        raise ClipfuseError(f"OpenVINO device {device} cannot compute in {requested} (it offers "
                            f"{', '.join(capabilities)}); use --precision fp32 or auto")
    if requested == "bf16" and head in BF16_REFUSED and not allow_refused:
        raise ClipfuseError(f"bf16 is refused for the {head} head: {BF16_REFUSED[head]}; "
                            "use --precision fp32 (auto does)")
    return requested


def default_cache_dir(artifact: Path) -> Path:
    """Beside the graph when that folder is writable (read-only model folders are common on devices)."""
    if os.access(artifact.parent, os.W_OK):
        return artifact.parent / f"{artifact.stem}.openvino-cache"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "clipfuse" / "openvino"


def cache_folder(root: Path, meta: Manifest, precision: str) -> Path:
    """One folder per graph content and precision under `root`: a graph re-exported under the same
    name never meets its predecessor's blob, and a precision never meets another's (see above)."""
    digest = str(meta.onnx_sha256 or "unhashed")[:16]
    if meta.onnx_data_sha256:       # weights in a data file: same graph, other weights
        digest += "-" + meta.onnx_data_sha256[:8]
    return root / f"{digest}-{precision}"


class OpenVINOBackend(Backend):
    """One compiled model + one infer request. Options: device (CPU, GPU, GPU.1, NPU, AUTO:...:
    passed to OpenVINO as given), precision (auto/fp32/bf16/fp16), threads, cache_dir (None: the
    default above; "" disables caching), allow_refused_bf16 (benchmarks only)."""

    name = "openvino"

    def __init__(self, artifact: Path, manifest: dict, backend: str = "openvino", **options) -> None:
        super().__init__(artifact, manifest, **options)
        ov, props, hint = import_openvino()
        self.core = ov.Core()
        self.device = str(options.get("device") or "CPU")
        available = list(self.core.available_devices)
        # "GPU.1" is a GPU; AUTO/HETERO/MULTI ("AUTO:GPU,CPU") are OpenVINO's own device selectors
        family = self.device.split(":")[0].split(".")[0]
        if family not in {d.split(".")[0] for d in available} | {"AUTO", "HETERO", "MULTI"}:
            raise ClipfuseError(f"OpenVINO has no device {self.device!r} here; available: {', '.join(available)}")
        caps = device_capabilities(self.core, self.device)
        wanted = resolve_precision(str(options.get("precision") or "auto"), manifest, caps, self.device,
                                   allow_refused=bool(options.get("allow_refused_bf16")))
        config: Dict[str, object] = {
            hint.inference_precision: getattr(ov.Type, _OV_TYPE[wanted][0]),
            # one stream, all cores on one request: what a segmenter's batched window call wants
            hint.performance_mode: hint.PerformanceMode.LATENCY,
        }
        if options.get("threads") and self.device.startswith("CPU"):
            config[props.inference_num_threads] = int(options["threads"])
        cache = options.get("cache_dir")
        self.cache_dir: Optional[Path] = None
        if cache != "":
            self.cache_dir = cache_folder(Path(cache) if cache else default_cache_dir(self.artifact),
                                          self.meta, wanted)
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ClipfuseError(f"cannot create the OpenVINO cache folder {self.cache_dir}: {exc.strerror}; "
                                    "pass another cache_dir") from None
            self.core.set_property({props.cache_dir: str(self.cache_dir)})
        try:
            # compiling from the path (not a read model) lets a cache hit skip reading the ONNX too
            self.compiled = self.core.compile_model(str(self.artifact), self.device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError/its own types with long texts
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClipfuseError(f"OpenVINO cannot compile {self.artifact.name} for {self.device}: {first}") from None
        try:
            used = self.compiled.get_property(hint.inference_precision)
            self.precision = _FROM_OV.get(used.get_type_name(), wanted)
        except Exception:
            self.precision = wanted
        self.request = self.compiled.create_infer_request()
        # A port can carry several tensor names (an ONNX output that is also an internal value, as a
        # frame graph's labels): address every port by the name the manifest's contract uses.
        declared = {t.name for t in self.meta.inputs + self.meta.outputs}
        self._port_names = {p: _contract_name(p, declared) for p in list(self.compiled.inputs) + list(self.compiled.outputs)}
        self.input_names = [self._port_names[p] for p in self.compiled.inputs]
        self.output_names = [self._port_names[p] for p in self.compiled.outputs]
        self._dtypes = {self._port_names[p]: np.dtype(p.get_element_type().to_dtype()) for p in self.compiled.inputs}

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ClipfuseError(f"{self.artifact.name} needs input(s) {', '.join(missing)}")
        inputs = {n: np.ascontiguousarray(feeds[n], dtype=self._dtypes[n]) for n in self.input_names}
        results = self.request.infer(inputs)
        # results are keyed by output port; copies, because the request reuses its buffers
        return {name: np.array(results[port], copy=True) for port, name in zip(self.compiled.outputs, self.output_names)}

    # -- the timing interface (base.Backend): inputs bound once, a launch is one infer() ----------
    def stage(self, feeds: Dict[str, np.ndarray]) -> None:
        """Bind `feeds` to the infer request as tensors sharing the host arrays (no copy per call)."""
        import openvino
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ClipfuseError(f"{self.artifact.name} needs input(s) {', '.join(missing)}")
        # kept: the request reads these arrays at every launch
        self._staged = {n: np.ascontiguousarray(feeds[n], dtype=self._dtypes[n]) for n in self.input_names}
        for name, arr in self._staged.items():
            self.request.set_tensor(name, openvino.Tensor(arr, shared_memory=True))

    def launch(self) -> None:
        self.request.infer()

    def close(self) -> None:
        self.request = self.compiled = None
        self._staged = None


def _contract_name(port, declared) -> str:
    """The port's name in the manifest's contract, else OpenVINO's pick among its names."""
    names = sorted(port.get_names())
    return next((n for n in names if n in declared), port.get_any_name())
