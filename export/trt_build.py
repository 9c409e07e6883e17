"""TensorRT engine pieces: naming, shape profiles, the trtexec equivalent, the build itself.

The build goes through Polygraphy's loaders (NetworkFromOnnxPath -> CreateConfig[RTX] ->
EngineBytesFromNetwork), for both flavours (clipfuse.runtime.trt_support). Precision is decided
in the ONNX (clipfuse.export.fp16): networks are STRONGLY_TYPED, so what the graph says is what
runs. The weak-typed FP16 flag (FP32 ONNX + BuilderFlag.FP16) exists only for enterprise
TensorRT < 10 (8.6, JetPack 6.0); TensorRT for RTX has no weak typing at all.
Everything here except `build_engine_bytes` works without TensorRT.
"""
from __future__ import annotations

import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from clipfuse.runtime import trt_support
from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.trt_support import check_io_contract  # noqa: F401  (re-exported)
from clipfuse.runtime.trt_support import major as trt_major  # noqa: F401  (re-exported)
from clipfuse.runtime.trt_support import short_version as short_trt_version

PRECISIONS = ("fp16", "fp32")
Shapes = Tuple[List[int], List[int], List[int]]


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


def normalise_sm(sm: str) -> str:
    """'8.7', 'sm87', 'SM_87', '87' -> '87'."""
    digits = re.sub(r"^sm_?", "", str(sm).strip().lower()).replace(".", "")
    if not digits.isdigit() or len(digits) < 2:
        raise ClipfuseError(f"cannot read a GPU SM from {sm!r} (expected e.g. 87 or 8.7)")
    return digits


def targets_tag(targets: Sequence[str]) -> str:
    """['80', '86'] -> 'sm80_86' (RTX builds for several compute capabilities)."""
    return "sm" + "_".join(normalise_sm(t) for t in targets)


def engine_file_name(stem: str, flavour: str, version: str, targets: Sequence[str], precision: str,
                     profile: BatchProfile, onnx_sha256: str) -> str:
    """NAME.<trt|rtx><X.Y>-sm<targets>-<prec>-b<min>_<opt>_<max>-<hash8>.engine: every property an
    engine is tied to, e.g. sclip.trt10.3-sm87-fp16-b1_4_16-1a2b3c4d.engine or
    sclip.rtx1.7-sm80_86_89_120-fp16-b1_4_16-1a2b3c4d.engine."""
    prefix = trt_support.flavour(flavour).prefix
    return (f"{stem}.{prefix}{short_trt_version(version)}-{targets_tag(targets)}-{precision}-"
            f"{profile.tag()}-{onnx_sha256[:8]}.engine")


def timing_cache_name(version: str, sm: str) -> str:
    return f"timing.trt{short_trt_version(version)}-sm{normalise_sm(sm)}.cache"


@dataclass(frozen=True)
class InputShape:
    """One graph input: name and dims, None where the dim is dynamic."""

    name: str
    dims: Tuple[Optional[int], ...]

    def shapes(self, dynamic: Dict[int, BatchProfile]) -> Shapes:
        out: Shapes = ([], [], [])
        for axis, d in enumerate(self.dims):
            if d is not None:
                for s in out:
                    s.append(d)
                continue
            if axis not in dynamic:
                raise ClipfuseError(f"input {self.name!r} has a dynamic axis {axis} without a profile "
                                    "(only axis 0 (batch, masks, crops; classes of class_embeddings) and the names axis of "
                                    "class_rows may be dynamic)")
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


# Names per class in a dynamic-vocabulary frame graph's `class_rows` [classes, names] input.
NAMES_PER_CLASS = BatchProfile(1, 1, 8)


def input_profiles(inputs: Sequence[InputShape], batch: BatchProfile, classes: BatchProfile) -> Dict[str, Shapes]:
    """min/opt/max shape of every input: a dynamic axis 0 gets the batch profile (images, frames,
    text tokens, refer masks/crops); a dynamic class_embeddings [rows, E] input gets the class
    profile, and a frame graph's class_rows [classes, names] the class profile and NAMES_PER_CLASS."""
    def dynamic_axes(name: str) -> Dict[int, BatchProfile]:
        if name == "class_embeddings":
            return {0: classes}
        if name == "class_rows":
            return {0: classes, 1: NAMES_PER_CLASS}
        return {0: batch}

    return {inp.name: inp.shapes(dynamic_axes(inp.name)) for inp in inputs}


def trtexec_command(onnx_path: "str | Path", engine_path: "str | Path", profiles: Dict[str, Shapes],
                    timing_cache: "str | Path", workspace_bytes: int, opt_level: int,
                    strongly_typed: bool = True, weak_fp16: bool = False) -> str:
    """The trtexec line that builds the same engine on the device (enterprise TensorRT)."""
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if strongly_typed:
        args.append("--stronglyTyped")
    if weak_fp16:
        args.append("--fp16")
    args += _shape_args(profiles, "--{}Shapes=")
    args += [f"--timingCacheFile={timing_cache}",
             f"--memPoolSize=workspace:{max(1, workspace_bytes >> 20)}M",
             f"--builderOptimizationLevel={opt_level}"]
    return " ".join(shlex.quote(a) for a in args)


def polygraphy_command(onnx_path: "str | Path", engine_path: "str | Path", profiles: Dict[str, Shapes],
                       targets: Sequence[str], workspace_bytes: int, opt_level: int) -> str:
    """The Polygraphy line that builds the same TensorRT-RTX engine (RTX ships no trtexec)."""
    args = ["polygraphy", "convert", str(onnx_path), "--strongly-typed", "-o", str(engine_path)]
    if any(mn != mx for mn, _, mx in profiles.values()):
        for key, k in (("min", 0), ("opt", 1), ("max", 2)):
            args.append(f"--trt-{key}-shapes")
            args += [f"{n}:[{','.join(str(d) for d in s[k])}]" for n, s in profiles.items()]
    args += ["--compute-capabilities", *[f"{t[:-1]}.{t[-1]}" for t in targets],
             "--pool-limit", f"workspace:{workspace_bytes}", "--builder-optimization-level", str(opt_level)]
    return "POLYGRAPHY_USE_TENSORRT_RTX=1 " + " ".join(shlex.quote(a) for a in args)


def _shape_args(profiles: Dict[str, Shapes], fmt: str) -> List[str]:
    if not any(mn != mx for mn, _, mx in profiles.values()):
        return []

    def spec(k: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[k])}" for name, shapes in profiles.items())
    return [fmt.format(key) + spec(k) for k, key in enumerate(("min", "opt", "max"))]


def _dtype_name(trt, dtype) -> str:
    import numpy as np
    return np.dtype(trt.nptype(dtype)).name


def network_io(trt, network, profiles: Dict[str, Shapes]) -> Dict[str, list]:
    """I/O tensors of the network the engine is built from: name, dtype, shape (-1 = dynamic),
    and each input's min/opt/max profile."""
    io: Dict[str, list] = {"inputs": [], "outputs": []}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        mn, opt, mx = profiles[t.name]
        io["inputs"].append({"name": t.name, "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape),
                             "profile": [list(mn), list(opt), list(mx)]})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io["outputs"].append({"name": t.name, "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)})
    return io


def build_engine_bytes(flavour: str, onnx_path: Path, *, profiles: Dict[str, Shapes], strongly_typed: bool,
                       weak_fp16: bool, workspace_bytes: int, opt_level: int, targets: Sequence[str],
                       timing_cache: Optional[Path]) -> Tuple[bytes, Dict[str, list]]:
    """Parse + configure + build with Polygraphy's loaders; returns (engine bytes, network I/O).

    enterprise TensorRT: one target (this GPU), timing cache read and updated;
    TensorRT for RTX: compute-capability `targets`, ahead of time (no GPU needed), no timing cache.
    """
    pg_trt = trt_support.polygraphy_trt(flavour)
    trt = trt_support.import_trt(flavour)
    from polygraphy.exception import PolygraphyException

    try:
        builder, network, parser = pg_trt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed or None)()
    except PolygraphyException as exc:
        reason = _parser_errors(trt, onnx_path, strongly_typed) or _first_line(exc)
        raise ClipfuseError(f"{trt_support.flavour(flavour).label} could not parse {onnx_path.name}: "
                            f"{reason}") from None
    profile = pg_trt.Profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in profiles:
            raise ClipfuseError(f"network input {name!r} has no shape profile")
        mn, opt, mx = profiles[name]
        profile.add(name, mn, opt, mx)
    common = dict(profiles=[profile], memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)},
                  builder_optimization_level=int(opt_level))
    if flavour == "rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX
        caps = [(int(t[:-1]), int(t[-1])) for t in targets]
        config = CreateConfigRTX(compute_capabilities=caps, **common)
        save_cache = None
    else:
        config = pg_trt.CreateConfig(fp16=weak_fp16 or None, load_timing_cache=_existing(timing_cache), **common)
        save_cache = str(timing_cache) if timing_cache else None
    io = network_io(trt, network, profiles)
    try:
        with warnings.catch_warnings():
            # Polygraphy's common config touches the timing cache, a documented no-op in RTX
            warnings.simplefilter("ignore", DeprecationWarning)
            engine = pg_trt.EngineBytesFromNetwork((builder, network, parser), config=config,
                                                   save_timing_cache=save_cache)()
    except PolygraphyException as exc:
        raise ClipfuseError(f"{trt_support.flavour(flavour).label} build of {onnx_path.name} failed: "
                            f"{_first_line(exc)}") from None
    return bytes(engine), io


def _parser_errors(trt, onnx_path: Path, strongly_typed: bool) -> str:
    """The ONNX parser's own errors (Polygraphy logs them and raises a generic message)."""
    try:
        logger = trt_support.make_logger(trt, echo_severity=-1)
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if parser.parse_from_file(str(onnx_path)):
            return ""
        # one line: the descriptions carry newlines
        return "; ".join(" ".join(f"{parser.get_error(i).node_name() or '?'}: {parser.get_error(i).desc()}".split())
                         for i in range(parser.num_errors))
    except Exception:
        return ""


def _existing(path: Optional[Path]) -> Optional[str]:
    return str(path) if path is not None and Path(path).is_file() else None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
