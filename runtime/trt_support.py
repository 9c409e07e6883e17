"""The one place that knows TensorRT's two flavours, its logger, versions and CUDA error codes.

Flavours (both Python modules expose the same core API: Builder, OnnxParser, Runtime, tensor I/O):
* ``tensorrt``: NVIDIA TensorRT 8.6 / 10.x / 11.x (module ``tensorrt``): the device and Jetson
  path. Engines are tied to the TensorRT release and to the GPU they were built on; timing cache.
* ``rtx``: TensorRT for RTX (module ``tensorrt_rtx``, wheel ``tensorrt-rtx-cu13``): builds ahead of
  time on any machine, GPU or not ("CPU-only AOT"), for a list of compute-capability targets;
  the engine is JIT-specialised on the first run; runtime cache instead of a timing cache;
  strongly typed only.

Torch-free and import-light: nothing here imports a flavour until asked, so the runtime (and
`clipfuse doctor`) can use it on a machine with neither. Polygraphy picks its TensorRT module from
``polygraphy.config.USE_TENSORRT_RTX`` (env POLYGRAPHY_USE_TENSORRT_RTX) when its TensorRT backend
is first imported; `polygraphy_trt` sets both to the flavour clipfuse chose, so clipfuse and
Polygraphy never drive two different TensorRTs in one process.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .errors import ClipfuseError

if TYPE_CHECKING:
    from .manifest import Manifest


@dataclass(frozen=True)
class Flavour:
    key: str          # what --trt takes and manifests record: "tensorrt" or "rtx"
    module: str       # Python module name
    label: str        # for messages
    prefix: str       # engine file name prefix: NAME.<prefix><X.Y>-...
    wheel: str        # what to pip install


FLAVOURS: Dict[str, Flavour] = {
    "tensorrt": Flavour("tensorrt", "tensorrt", "TensorRT", "trt", "tensorrt (NVIDIA's index; JetPack on Jetson)"),
    "rtx": Flavour("rtx", "tensorrt_rtx", "TensorRT for RTX", "rtx", "tensorrt-rtx-cu13"),
}
# "auto" prefers the enterprise TensorRT: where both exist it is the deployment target.
AUTO_ORDER = ("tensorrt", "rtx")


def flavour(key: str) -> Flavour:
    if key not in FLAVOURS:
        raise ClipfuseError(f"unknown TensorRT flavour {key!r}; choose one of: {', '.join(FLAVOURS)}")
    return FLAVOURS[key]


def _import(module: str):
    # the enterprise PyPI wheels are stubs that raise at import time when their libraries are
    # missing, so any exception (not only ImportError) means "not usable here"
    return importlib.import_module(module)


def import_trt(key: str):
    """The TensorRT module of flavour `key`, or one ClipfuseError line saying how to get it."""
    fl = flavour(key)
    try:
        return _import(fl.module)
    except Exception as exc:
        raise ClipfuseError(f"{fl.label} (module {fl.module}) is not usable here ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                            f"install {fl.wheel}") from None


def probe(key: str) -> Optional[str]:
    """The flavour's version when it imports here, else None (never raises)."""
    try:
        return str(_import(flavour(key).module).__version__)
    except Exception:
        return None


def available() -> List[str]:
    return [k for k in AUTO_ORDER if probe(k)]


def choose(requested: Optional[str] = None) -> str:
    """'tensorrt' / 'rtx' as asked, or for None/'auto' the first importable of AUTO_ORDER."""
    if requested and requested != "auto":
        flavour(requested)
        return requested
    found = available()
    if not found:
        raise ClipfuseError("no TensorRT here: neither tensorrt nor tensorrt_rtx imports "
                            "(pip install tensorrt-rtx-cu13 builds on any machine; use --dry-run to plan)")
    return found[0]


def short_version(version: str) -> str:
    """'10.3.0.30' -> '10.3' (engines are tied to the release)."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    if not m:
        raise ClipfuseError(f"cannot read a TensorRT version from {version!r} (expected e.g. 10.3)")
    return f"{m.group(1)}.{m.group(2)}"


def major(version: str) -> int:
    return int(short_version(version).split(".")[0])


def make_logger(trt, echo_severity: Any = None):
    """A trt.ILogger that keeps every line in `.lines` (quoted when a build or load fails) and
    echoes WARNING and worse to stderr."""
    threshold = int(echo_severity if echo_severity is not None else trt.ILogger.Severity.WARNING)

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: List[str] = []

        def log(self, severity, msg):
            self.lines.append(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}")
            if int(severity) <= threshold:
                print(f"tensorrt: {msg}", file=sys.stderr)

        def tail(self, n: int = 3) -> str:
            return " | ".join(self.lines[-n:]) or "no TensorRT log"

    return Logger()


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (12.6+/13.x), else `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore
    except ImportError:
        from cuda import cudart  # type: ignore  # cuda-python < 12.6; gone in 13.x
    return cudart


def cuda_check(result, what: str = "CUDA call") -> tuple:
    """cuda-python returns (error, *values): the values, or one ClipfuseError line."""
    err, rest = result[0], result[1:]
    if int(err) != 0:
        raise ClipfuseError(f"CUDA error {getattr(err, 'name', int(err))} in {what}")
    return rest


def device_memory_in_use() -> Optional[int]:
    """Bytes in use on the current CUDA device (device-wide: the driver knows no per-process
    figure), or None without cuda-python or a GPU. What the device backends report as memory."""
    try:
        err, free, total = import_cudart().cudaMemGetInfo()
    except Exception:
        return None
    return int(total - free) if int(err) == 0 else None


def check_io_contract(io: Dict[str, list], manifest: "Manifest | dict", label: str) -> None:
    """Refuse an engine whose I/O tensors differ from the manifest's contract: same names in the same
    order, same dtypes, fixed dims equal, symbolic dims dynamic (-1) and covered by the profile."""
    from .manifest import parse_manifest

    meta = parse_manifest(manifest, label)
    problems = []
    for kind in ("inputs", "outputs"):
        want, got = getattr(meta, kind), io.get(kind, [])
        if [w.name for w in want] != [g["name"] for g in got]:
            problems.append(f"{kind} {[g['name'] for g in got]} != manifest {[w.name for w in want]}")
            continue
        for w, g in zip(want, got):
            if w.dtype != g["dtype"]:
                problems.append(f"{g['name']} dtype {g['dtype']} != manifest {w.dtype}")
            if len(w.shape) != len(g["shape"]):
                problems.append(f"{g['name']} rank {len(g['shape'])} != manifest {len(w.shape)}")
                continue
            for axis, (wd, gd) in enumerate(zip(w.shape, g["shape"])):
                if isinstance(wd, int) and wd != gd:
                    problems.append(f"{g['name']} axis {axis} is {gd}, manifest says {wd}")
                if isinstance(wd, str) and gd != -1 and kind == "inputs":
                    problems.append(f"{g['name']} axis {axis} ({wd}) is fixed to {gd}, must stay dynamic")
            if kind == "inputs":
                mn, _, mx = g["profile"]
                for axis, wd in enumerate(w.shape):
                    if isinstance(wd, int) and not mn[axis] == mx[axis] == wd:
                        problems.append(f"{g['name']} profile axis {axis} {mn[axis]}..{mx[axis]} != {wd}")
    if problems:
        raise ClipfuseError(f"{label}: engine I/O does not match the manifest: {'; '.join(problems)}")


def engine_io(trt, engine) -> Dict[str, list]:
    """I/O tensors of a deserialized engine, in the form check_io_contract reads."""
    import numpy as np

    io: Dict[str, list] = {"inputs": [], "outputs": []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = {"name": name, "dtype": np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name,
                 "shape": list(engine.get_tensor_shape(name))}
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            entry["profile"] = [list(s) for s in engine.get_tensor_profile_shape(name, 0)]
            io["inputs"].append(entry)
        else:
            io["outputs"].append(entry)
    return io


def polygraphy_trt(key: str):
    """Polygraphy's TensorRT backend (polygraphy.backend.trt), driving flavour `key`.

    Polygraphy binds its TensorRT module when polygraphy.backend.trt is first imported, from
    config.USE_TENSORRT_RTX; set it (and the env var child processes inherit) first, and refuse
    a process that already bound the other flavour.
    """
    want_rtx = flavour(key).key == "rtx"
    try:
        from polygraphy import config as pg_config
    except ImportError:
        raise ClipfuseError("polygraphy is not installed: pip install polygraphy "
                            "(it is in clipfuse's trt and dev extras)") from None
    bound = "polygraphy.backend.trt" in sys.modules
    if bound and bool(pg_config.USE_TENSORRT_RTX) != want_rtx:
        other = "rtx" if pg_config.USE_TENSORRT_RTX else "tensorrt"
        raise ClipfuseError(f"Polygraphy in this process already drives TensorRT flavour {other!r}; "
                            f"use one flavour per process (--trt {other}, or a new process)")
    pg_config.USE_TENSORRT_RTX = want_rtx
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if want_rtx else "0"
    import_trt(key)  # one clear line now rather than Polygraphy's critical log later
    from polygraphy.backend import trt as pg_trt
    from polygraphy.logger import G_LOGGER
    # clipfuse prints its own progress; Polygraphy's INFO lines (config dumps) are noise for users
    if not os.environ.get("CLIPFUSE_DEBUG"):
        G_LOGGER.module_severity = G_LOGGER.WARNING
    return pg_trt


def rtx_targets(trt) -> List[str]:
    """Compute-capability targets this TensorRT-RTX build knows (e.g. ['75', '80', '86', ...])."""
    return sorted((name[2:] for name in trt.ComputeCapability.__members__ if re.fullmatch(r"SM\d+", name)),
                  key=int)


# Turing (7.5) is opt-in in TensorRT-RTX's support matrix: not a default target.
RTX_DEFAULT_EXCLUDED = ("75",)


# ---------------------------------------------------------------------------------------------
# Which flavour runs on which GPU: the one table doctor, build, the backends, bench and the tests read
# ---------------------------------------------------------------------------------------------
# SM -> the GPUs it is, for messages. Sources: NVIDIA's CUDA GPU compute-capability list and the
# support matrices of TensorRT 10.x and TensorRT for RTX 1.x.
GPU_FAMILIES: Dict[str, str] = {
    "72": "Volta: Jetson Xavier",
    "75": "Turing: T4, RTX 20",
    "80": "Ampere: A100, A30",
    "86": "Ampere: A10, A40, RTX 30, RTX A6000",
    "87": "Ampere: Jetson Orin",
    "89": "Ada: L4, L40, RTX 40",
    "90": "Hopper: H100, H200, GH200",
    "100": "Blackwell: B200, GB200",
    "103": "Blackwell: B300, GB300",
    "110": "Blackwell: Jetson Thor",
    "120": "Blackwell: RTX 50, RTX PRO 6000",
    "121": "Blackwell: DGX Spark",
}

# flavour -> SMs its engines deserialize and run on.
# * TensorRT for RTX 1.7 targets the RTX architectures only. Measured on an H200 (SM 90): it builds
#   (ahead of time, and with ComputeCapability.CURRENT) but refuses the engine at deserialize
#   ("TensorRT-RTX does not support this compute capability"). Turing (75) is an opt-in target.
#   Jetson Orin (87) and Thor (110) are not RTX targets either.
# * Enterprise TensorRT 10.x/11.x covers the data-centre and Jetson GPUs (Volta/Xavier only up to
#   TensorRT 8.6 = JetPack 5); it builds on the GPU that runs the engine.
RUNS_ON: Dict[str, frozenset] = {
    "rtx": frozenset({"75", "80", "86", "89", "120", "121"}),
    "tensorrt": frozenset({"72", "75", "80", "86", "87", "89", "90", "100", "103", "110", "120", "121"}),
}


def gpu_label(sm: str) -> str:
    """'SM 90 (Hopper: H100, H200, GH200)' for messages."""
    family = GPU_FAMILIES.get(str(sm))
    return f"SM {sm} ({family})" if family else f"SM {sm}"


def runs_on(key: str, sm: str) -> bool:
    """Whether engines of flavour `key` run on a GPU of compute capability `sm` ("90").

    An SM this table does not know (a newer GPU) counts as served by enterprise TensorRT, whose
    newer releases add GPUs, and as not served by TensorRT for RTX unless the installed release
    lists it as a compute-capability target."""
    sm = str(sm)
    if key == "rtx":
        if sm in RUNS_ON["rtx"]:
            return True
        if sm in GPU_FAMILIES:
            return False
        try:
            return sm in rtx_targets(import_trt("rtx"))
        except ClipfuseError:
            return False
    flavour(key)
    return sm in RUNS_ON["tensorrt"] or sm not in GPU_FAMILIES


def serving_flavours(sm: str) -> List[str]:
    """The flavours (AUTO_ORDER) whose engines run on `sm`, installed or not."""
    return [k for k in AUTO_ORDER if runs_on(k, sm)]


def device_sm(device: int = 0) -> Optional[str]:
    """The compute capability of CUDA device `device` as "90", or None without a visible GPU.

    The one function every engine decision asks (tests simulate a GPU by replacing it)."""
    from .doctor import gpu_info
    info = gpu_info(device)
    return info.sm if info is not None else None


def fix_line(sm: str) -> str:
    """What to do on a GPU whose engines must come from another flavour (the tail of every refusal)."""
    if runs_on("tensorrt", sm):
        return ("install TensorRT (NVIDIA's tensorrt wheels; JetPack on Jetson) and build here with "
                "`clipfuse build --trt tensorrt`, or run the ONNX graph with `--backend ort-cuda` "
                "(onnxruntime-gpu)")
    return "run the ONNX graph with `--backend ort-cuda` (onnxruntime-gpu)"


def cannot_run_reason(key: str, sm: str) -> Optional[str]:
    """None when engines of flavour `key` run on `sm`; else one line: why not and what to do."""
    if runs_on(key, sm):
        return None
    return f"{flavour(key).label} engines do not run on this GPU, {gpu_label(sm)}: {fix_line(sm)}"


def choose_for_device(requested: Optional[str], sm: Optional[str], allow_foreign_gpu: bool = False) -> str:
    """The flavour to build with on a machine whose GPU is `sm` (None: no GPU, ahead-of-time builds).

    'auto' takes the first installed flavour whose engines run on this GPU; a flavour asked for
    explicitly (or the only one installed) that cannot serve this GPU is refused with the fix,
    unless `allow_foreign_gpu` (the engine is then for other machines)."""
    if sm is None:
        return choose(requested)
    auto = requested in (None, "auto")
    installed = available()
    if auto:
        serving = [k for k in installed if runs_on(k, sm)]
        if serving:
            return serving[0]
        if allow_foreign_gpu and installed:
            return installed[0]
        if not installed:
            return choose(requested)  # the "no TensorRT here" line
        have = ", ".join(flavour(k).label for k in installed)
        raise ClipfuseError(f"{have} cannot build engines that run on this GPU, {gpu_label(sm)}: {fix_line(sm)}; "
                            "--allow-foreign-gpu builds for other GPUs anyway")
    key = choose(requested)
    reason = cannot_run_reason(key, sm)
    if reason and not allow_foreign_gpu:
        raise ClipfuseError(f"{reason}; --allow-foreign-gpu builds the {flavour(key).label} engine for other GPUs anyway")
    return key


def support_matrix() -> List[Dict[str, Any]]:
    """Rows of the flavour x GPU table (doctor --json, docs)."""
    return [{"sm": sm, "gpus": family, **{k: runs_on(k, sm) for k in AUTO_ORDER}}
            for sm, family in GPU_FAMILIES.items()]
