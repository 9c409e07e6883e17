"""`clipfuse triton-repo`: a Triton model repository that a standalone Triton loads as is.

Per artifact NAME:
  NAME/            Python backend, the protocol (BLS): image [H, W, 3] -> labels, confidence.
                   Dynamic batching over requests of equal image size; all windows of a batch go
                   to NAME_windows in requests of at most its max_batch_size.
  NAME_windows/    the graph itself: onnxruntime_onnx (model.onnx) or tensorrt_plan (model.plan),
                   max_batch_size from the engine profile, dynamic batching, instance groups.
                   --windows-backend python: a Python-backend model running the graph with
                   clipfuse's own backends (for Triton builds without the ONNX Runtime / TensorRT
                   backends, e.g. the CPU-only server bundled with nvidia-pytriton).
The Python models carry a copy of clipfuse.runtime (pure Python, numpy only) in their version
folder, so the repository is self-contained: copy it, point Triton at it.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import ClipfuseError
from ..manifest import Manifest, manifest_path_for
from .core import DEFAULT_MAX_PIXELS, INPUT, OUTPUTS, model_parameters
from .pbtxt import Enum, parse_config, to_pbtxt
from .server import parse_artifacts

TEMPLATES = Path(__file__).parent / "triton_models"
WINDOW_BACKENDS = ("auto", "onnxruntime", "tensorrt", "python")
PARAM_WINDOWS_MODEL = "clipfuse_windows_model"
PARAM_WINDOW_BATCH = "clipfuse_window_batch"
PARAM_MAX_PIXELS = "clipfuse_max_pixels"
PARAM_SCORES = "clipfuse_scores_output"
PARAM_BACKEND = "clipfuse_backend"
_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32"}


@dataclass
class RepoOptions:
    windows_backend: str = "auto"       # auto: tensorrt for .engine, onnxruntime for .onnx
    device: str = "gpu"                 # kind of the windows model's instances
    windows_instances: int = 1
    protocol_instances: int = 1
    max_batch_size: int = 8             # images per Triton batch of the protocol model
    window_batch: Optional[int] = None  # windows model max_batch_size (.onnx); engines: profile max
    queue_delay_us: int = 2000
    max_pixels: int = DEFAULT_MAX_PIXELS
    verify: bool = True


def _dims(shape: Sequence) -> List[int]:
    return [int(d) for d in shape[1:]]  # drop the batch axis (Triton's max_batch_size covers it)


def windows_config(name: str, meta: Manifest, backend: str, max_batch: int, options: RepoOptions,
                   artifact_name: str) -> dict:
    kind = Enum("KIND_CPU" if backend == "python" or options.device == "cpu" else "KIND_GPU")
    config: Dict = {"name": name}
    if backend == "python":
        config["backend"] = "python"
    else:
        config["platform"] = "tensorrt_plan" if backend == "tensorrt" else "onnxruntime_onnx"
    config.update({
        "max_batch_size": int(max_batch),
        # the graph's own contract, every tensor (a frame graph has labels, confidence and scores)
        "input": [{"name": t.name, "data_type": Enum(_TYPES[t.dtype]), "dims": _dims(t.shape)}
                  for t in meta.inputs],
        "output": [{"name": t.name, "data_type": Enum(_TYPES[t.dtype]), "dims": _dims(t.shape)}
                   for t in meta.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": int(options.queue_delay_us)},
        "instance_group": [{"count": int(options.windows_instances), "kind": kind}],
    })
    if backend == "python":
        config["parameters"] = {PARAM_BACKEND: "auto", "clipfuse_artifact": artifact_name}
    return config


def protocol_config(name: str, windows_name: str, params: Dict[str, str], window_batch: int,
                    scores_output: str, options: RepoOptions) -> dict:
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": int(options.max_batch_size),
        "input": [{"name": INPUT, "data_type": Enum("TYPE_UINT8"), "dims": [-1, -1, 3]}],
        "output": [{"name": OUTPUTS[0], "data_type": Enum("TYPE_INT32"), "dims": [-1, -1]},
                   {"name": OUTPUTS[1], "data_type": Enum("TYPE_FP32"), "dims": [-1, -1]}],
        "dynamic_batching": {"max_queue_delay_microseconds": int(options.queue_delay_us)},
        "instance_group": [{"count": int(options.protocol_instances), "kind": Enum("KIND_CPU")}],
        "parameters": {**params, PARAM_WINDOWS_MODEL: windows_name, PARAM_WINDOW_BATCH: str(int(window_batch)),
                       PARAM_MAX_PIXELS: str(int(options.max_pixels)), PARAM_SCORES: scores_output},
    }


def validate_config(text: str, model_dir: Path) -> None:
    """Schema check (Triton's model_config.proto) plus the rules Triton applies on load that
    the schema cannot express: a platform/backend, the model file where Triton looks for it."""
    try:
        config = parse_config(text)
    except ImportError:
        raise
    except Exception as exc:
        raise ClipfuseError(f"{model_dir.name}/config.pbtxt does not match Triton's schema: {exc}") from None
    if config.name != model_dir.name:
        raise ClipfuseError(f"{model_dir.name}/config.pbtxt names the model {config.name!r}")
    files = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "python": "model.py"}
    key = config.platform or config.backend
    if key not in files:
        raise ClipfuseError(f"{model_dir.name}: unknown platform/backend {key!r}")
    if not (model_dir / "1" / files[key]).is_file():
        raise ClipfuseError(f"{model_dir.name}: Triton loads 1/{files[key]}, which is missing")
    if config.max_batch_size < 1 or not config.HasField("dynamic_batching"):
        raise ClipfuseError(f"{model_dir.name}: expected batching (max_batch_size >= 1, dynamic_batching)")


def _vendor_runtime(dest: Path) -> None:
    """Copy clipfuse.runtime's Python sources (no data files) to dest/clipfuse/runtime."""
    source = Path(__file__).resolve().parents[1]
    target = dest / "clipfuse" / "runtime"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "data", "*.pyc", "*.gz", "*.txt"))


def _write_model(model_dir: Path, config: dict, files: Dict[str, Path], template: Optional[str]) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy2(src, version / name)
    if template:
        shutil.copy2(TEMPLATES / template, version / "model.py")
        _vendor_runtime(version)
    (model_dir / "config.pbtxt").write_text(to_pbtxt(config), encoding="utf-8")


def write_repository(artifacts: Sequence[str], out: Path, options: Optional[RepoOptions] = None,
                     validate: bool = True) -> List[str]:
    """Write the repository to `out` (must not exist, or be empty); returns the model names.

    Written into a sibling temporary folder and renamed at the end: no half-written repository.
    """
    options = options or RepoOptions()
    if options.windows_backend not in WINDOW_BACKENDS:
        raise ClipfuseError(f"--windows-backend: choose one of {', '.join(WINDOW_BACKENDS)}")
    specs = parse_artifacts(artifacts)  # names checked before anything is written
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClipfuseError(f"{out} exists and is not empty; choose a new folder")
    if not out.parent.is_dir():
        raise ClipfuseError(f"{out.parent} is not a folder")
    # A fresh, uniquely named sibling: never a folder of the user's (".NAME.partial" could be one).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    names: List[str] = []
    try:
        for name, path in specs:
            names += _write_artifact(tmp, name, path, options)
        if validate:
            for model_dir in sorted(p for p in tmp.iterdir() if p.is_dir()):
                validate_config((model_dir / "config.pbtxt").read_text(encoding="utf-8"), model_dir)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


def engine_max_batch(meta: Manifest, artifact_name: str) -> int:
    """The engine profile's max batch from `engine.batch_profile` [min, opt, max], checked: the
    field is outside the engine's contract digest, so an edited manifest must not reach a config."""
    from ..limits import WINDOW_BATCH

    profile = meta.engine.batch_profile if meta.engine else None
    ok = (isinstance(profile, tuple) and len(profile) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in profile)
          and profile[0] <= profile[1] <= profile[2])
    if not ok:
        shown = list(profile) if isinstance(profile, tuple) else profile
        raise ClipfuseError(f"{artifact_name}: its manifest's engine.batch_profile {str(shown)[:40]!r} is not "
                            "[min, opt, max] positive integers; restore the manifest written by clipfuse build")
    WINDOW_BATCH.check(profile[2], f"{artifact_name}: engine.batch_profile max")
    return int(profile[2])


def _write_artifact(root: Path, name: str, path: Path, options: RepoOptions) -> List[str]:
    # Opening checks the manifest and the hash; the ORT CPU session it builds is the cheap proof
    # that the graph loads at all. Engines are not opened (no GPU needed to write a repository).
    from ..artifact import open_artifact

    artifact = open_artifact(path, kinds=("image", "frame"), verify=options.verify,
                             hint="triton-repo serves window and frame graphs")
    meta = artifact.meta
    manifest_path = manifest_path_for(path)
    if meta.dynamic_vocab:
        raise ClipfuseError(f"{path.name} has a dynamic vocabulary; export one with baked classes")
    engine = artifact.is_engine
    backend = options.windows_backend
    if backend == "auto":
        backend = "tensorrt" if engine else "onnxruntime"
    if backend == "tensorrt" and not engine:
        raise ClipfuseError(f"--windows-backend tensorrt needs a .engine, got {path.name}")
    if backend == "onnxruntime" and engine:
        raise ClipfuseError(f"--windows-backend onnxruntime needs a .onnx, got {path.name}")
    from ..protocol import protocol_from_manifest
    protocol = protocol_from_manifest(meta)
    if engine:
        max_batch = engine_max_batch(meta, path.name)
        if options.window_batch and options.window_batch > max_batch:
            raise ClipfuseError(f"--window-batch {options.window_batch} > the engine's profile max {max_batch}")
        max_batch = options.window_batch or max_batch
    else:
        max_batch = options.window_batch or 16
    frame = meta.kind == "frame"
    # A frame graph holds the whole protocol: it is the model, served as is (no protocol model).
    windows_name = name if frame else f"{name}_windows"
    files = {"model.plan" if backend == "tensorrt" else "model.onnx": path}
    template = None
    if backend == "python":
        files = {path.name: path, manifest_path.name: manifest_path}
        template = "windows_model.py"
    if not engine and meta.onnx_data_file:
        # the graph names its external-data file: it travels beside the graph, under its own name
        files[meta.onnx_data_file] = path.with_name(meta.onnx_data_file)
    config = windows_config(windows_name, meta, backend, max_batch, options, path.name)
    params = model_parameters(meta, protocol, path.name)
    if frame:
        config["parameters"] = {**config.get("parameters", {}), **params}
        _write_model(root / name, config, files, template)
        return [name]
    _write_model(root / windows_name, config, files, template)
    _write_model(root / name, protocol_config(name, windows_name, params, max_batch,
                                              meta.output_name, options), {}, "protocol_model.py")
    return [name, windows_name]
