"""TensorRT engine build from an ONNX graph: naming, trtexec equivalent, and the build itself.

Written against the TensorRT 10/11 Python API (tensor I/O, STRONGLY_TYPED networks, OnnxParser,
memory pool limits, builder_optimization_level, timing caches). Precision is decided in the ONNX
(clipfuse.export.fp16): TensorRT >= 10 builds strongly typed, so what the graph says is what runs.
The weak-typed BuilderFlag.FP16 path (FP32 ONNX + FP16 flag) exists only for TensorRT < 10 (8.6,
JetPack 6.0). Everything here except `build_engine` works without TensorRT.
"""
from __future__ import annotations

import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.fileio import atomic_path, sha256_file, write_bytes_atomic

PRECISIONS = ("fp16", "fp32")


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3:
            raise ClipfuseError(f"--batch {text!r}: expected MIN:OPT:MAX, e.g. 1:4:16")
        lo, opt, hi = values
        if not 1 <= lo <= opt <= hi:
            raise ClipfuseError(f"--batch {text!r}: need 1 <= MIN <= OPT <= MAX")
        return cls(lo, opt, hi)

    def tag(self) -> str:
        return f"b{self.min}_{self.opt}_{self.max}"

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def short_trt_version(version: str) -> str:
    """'10.3.0.30' -> '10.3' (engines are tied to the TensorRT release)."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    if not m:
        raise ClipfuseError(f"cannot read a TensorRT version from {version!r} (expected e.g. 10.3)")
    return f"{m.group(1)}.{m.group(2)}"


def normalise_sm(sm: str) -> str:
    """'8.7', 'sm87', '87' -> '87'."""
    digits = re.sub(r"^sm_?", "", str(sm).strip().lower()).replace(".", "")
    if not digits.isdigit() or len(digits) < 2:
        raise ClipfuseError(f"cannot read a GPU SM from {sm!r} (expected e.g. 87 or 8.7)")
    return digits


def engine_file_name(stem: str, trt_version: str, sm: str, precision: str,
                     profile: BatchProfile, onnx_sha256: str) -> str:
    """NAME.trt10.3-sm87-fp16-b1_4_16-<hash8>.engine: every property an engine is tied to."""
    return (f"{stem}.trt{short_trt_version(trt_version)}-sm{normalise_sm(sm)}-{precision}-"
            f"{profile.tag()}-{onnx_sha256[:8]}.engine")


def timing_cache_name(trt_version: str, sm: str) -> str:
    return f"timing.trt{short_trt_version(trt_version)}-sm{normalise_sm(sm)}.cache"


@dataclass(frozen=True)
class InputShape:
    """One graph input: name and dims, None where the dim is dynamic."""

    name: str
    dims: Tuple[Optional[int], ...]

    def shapes(self, dynamic: Dict[int, BatchProfile]) -> Tuple[List[int], List[int], List[int]]:
        out: Tuple[List[int], List[int], List[int]] = ([], [], [])
        for axis, d in enumerate(self.dims):
            if d is not None:
                for s in out:
                    s.append(d)
                continue
            if axis not in dynamic:
                raise ClipfuseError(f"input {self.name!r} has a dynamic axis {axis} without a profile "
                                    "(only the batch axis, and the class axis of class_embeddings, may be dynamic)")
            p = dynamic[axis]
            out[0].append(p.min), out[1].append(p.opt), out[2].append(p.max)
        return out


def graph_inputs(onnx_path: "str | Path") -> List[InputShape]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    result = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = tuple(d.dim_value if d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim)
        result.append(InputShape(inp.name, dims))
    return result


def input_profiles(inputs: Sequence[InputShape], batch: BatchProfile,
                   classes: BatchProfile) -> Dict[str, Tuple[List[int], List[int], List[int]]]:
    """min/opt/max shape of every input: axis 0 of the image is the batch; a dynamic
    class_embeddings [K, E] input gets the class-count profile on axis 0."""
    profiles = {}
    for inp in inputs:
        axis_profile = {0: classes if inp.name == "class_embeddings" else batch}
        profiles[inp.name] = inp.shapes(axis_profile)
    return profiles


def trtexec_command(onnx_path: "str | Path", engine_path: "str | Path",
                    profiles: Dict[str, Tuple[List[int], List[int], List[int]]],
                    timing_cache: "str | Path", workspace_bytes: int, opt_level: int,
                    strongly_typed: bool = True, weak_fp16: bool = False) -> str:
    """The trtexec line that builds the same engine on the device."""
    def spec(k: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[k])}" for name, shapes in profiles.items())

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if strongly_typed:
        args.append("--stronglyTyped")
    if weak_fp16:
        args.append("--fp16")
    if any(mn != mx for mn, _, mx in profiles.values()):
        args += [f"--minShapes={spec(0)}", f"--optShapes={spec(1)}", f"--maxShapes={spec(2)}"]
    args += [f"--timingCacheFile={timing_cache}",
             f"--memPoolSize=workspace:{max(1, workspace_bytes >> 20)}M",
             f"--builderOptimizationLevel={opt_level}"]
    return " ".join(shlex.quote(a) for a in args)


def trt_major(version: str) -> int:
    return int(short_trt_version(version).split(".")[0])


class _CapturingLogger:
    """A trt.ILogger that keeps every message (shown when a build or deserialize fails)."""

    def __new__(cls, trt, min_severity):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.lines: List[str] = []

            def log(self, severity, msg):
                self.lines.append(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}")
                if int(severity) <= int(min_severity):
                    print(f"tensorrt: {msg}", file=sys.stderr)

        return Logger()


def import_tensorrt():
    try:
        import tensorrt as trt  # type: ignore
    except Exception as exc:
        raise ClipfuseError(f"TensorRT is not usable here ({type(exc).__name__}: {exc}); "
                            "use --dry-run for the FP16 ONNX and the trtexec line to build on the device") from None
    return trt


def build_engine(onnx_path: Path, engine_path: Path, *, precision: str,
                 profiles: Dict[str, Tuple[List[int], List[int], List[int]]], workspace_bytes: int,
                 opt_level: int, timing_cache: Path) -> Dict[str, object]:
    """Build and write the engine (+ the updated timing cache). Returns build facts."""
    trt = import_tensorrt()
    logger = _CapturingLogger(trt, trt.ILogger.Severity.WARNING)
    major = trt_major(trt.__version__)
    builder = trt.Builder(logger)
    if major >= 10:
        # Strongly typed: the ONNX's dtypes (FP16 with FP32 islands + Casts) are the precisions.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ClipfuseError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = int(opt_level)
    if major < 10 and precision == "fp16":
        # TensorRT 8.6 fallback: weak typing, the builder picks FP16 kernels where it likes.
        config.set_flag(trt.BuilderFlag.FP16)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profiles:
            raise ClipfuseError(f"network input {name!r} has no shape profile")
        mn, opt, mx = profiles[name]
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        tail = " | ".join(logger.lines[-5:]) or "no log"
        raise ClipfuseError(f"TensorRT build of {onnx_path.name} failed: {tail}")
    seconds = time.perf_counter() - start
    write_bytes_atomic(engine_path, bytes(serialized))
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"build_seconds": round(seconds, 1), "tensorrt_version": trt.__version__,
            "engine_sha256": sha256_file(engine_path)}
