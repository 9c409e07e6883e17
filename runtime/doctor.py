"""What is installed here and what clipfuse can do with it (`clipfuse doctor`).

Every probe is guarded: a missing or broken package is reported, never raised. Torch-free at
import time; probes import their package only when called. The GPU probes (`gpu_info`) are also
what the builder and the TensorRT backend use to name and check engines.
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

# one home for the TensorRT/CUDA helpers; import_cudart stays importable from here
from . import trt_support
from .trt_support import cuda_check, import_cudart  # noqa: F401


@dataclass
class GpuInfo:
    name: str
    sm: str                      # "87" for compute capability 8.7
    total_bytes: Optional[int] = None
    free_bytes: Optional[int] = None
    driver: Optional[str] = None
    source: str = ""             # "cuda-python" or "nvidia-smi"

    def to_dict(self) -> dict:
        return asdict(self)


def _gpu_via_cuda_python(device: int) -> Optional[GpuInfo]:
    cudart = import_cudart()
    (count,) = cuda_check(cudart.cudaGetDeviceCount())
    if count <= device:
        return None
    (props,) = cuda_check(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    name = name.split("\x00", 1)[0]
    cuda_check(cudart.cudaSetDevice(device))
    free, total = cuda_check(cudart.cudaMemGetInfo())
    (drv,) = cuda_check(cudart.cudaDriverGetVersion())
    driver = f"CUDA {drv // 1000}.{(drv % 1000) // 10}"
    return GpuInfo(name=name, sm=f"{props.major}{props.minor}", total_bytes=int(total),
                   free_bytes=int(free), driver=driver, source="cuda-python")


def _gpu_via_nvidia_smi(device: int) -> Optional[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    out = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total,memory.free,driver_version",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    rows = [r for r in out.stdout.strip().splitlines() if r.strip()]
    if out.returncode != 0 or len(rows) <= device:
        return None
    name, cap, total, free, driver = [c.strip() for c in rows[device].split(",")]
    mib = 1 << 20
    return GpuInfo(name=name, sm=cap.replace(".", ""), total_bytes=int(float(total)) * mib,
                   free_bytes=int(float(free)) * mib, driver=f"driver {driver}", source="nvidia-smi")


def gpu_info(device: int = 0) -> Optional[GpuInfo]:
    """The GPU `device`, or None when there is none (or no way to ask)."""
    for probe in (_gpu_via_cuda_python, _gpu_via_nvidia_smi):
        try:
            info = probe(device)
        except Exception:
            continue
        if info is not None:
            return info
    return None


def _version(module: str, attr: str = "__version__") -> Optional[str]:
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    return str(getattr(mod, attr, "installed"))


def _dist_version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def _host_memory() -> Dict[str, Optional[int]]:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if ":" in line}
        return {"total_bytes": info.get("MemTotal"), "available_bytes": info.get("MemAvailable")}
    except Exception:
        pass
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        return {"total_bytes": pages * size, "available_bytes": avail * size}
    except Exception:
        return {"total_bytes": None, "available_bytes": None}


def _ort_providers() -> List[str]:
    try:
        import onnxruntime
        return list(onnxruntime.get_available_providers())
    except Exception:
        return []


def collect() -> Dict[str, Any]:
    """Everything doctor reports, as plain JSON-able data."""
    from ._version import __version__

    versions = {
        "clipfuse": __version__,
        "python": platform.python_version(),
        # package metadata, not imports: importing torch/open_clip takes seconds and is not needed
        "numpy": _version("numpy"),
        "torch": _dist_version("torch"),
        "open_clip": _dist_version("open_clip_torch"),
        "onnx": _dist_version("onnx"),
        "onnxruntime": _dist_version("onnxruntime") or _dist_version("onnxruntime-gpu"),
        # imported: a tensorrt wheel whose libraries are missing (the PyPI stubs) does not count
        "tensorrt": _version("tensorrt"),
        "tensorrt_rtx": _version("tensorrt_rtx"),
        "polygraphy": _dist_version("polygraphy"),
        "cuda-python": _dist_version("cuda-python") or _dist_version("cuda-bindings"),
    }
    ort_dists = [d for d in ("onnxruntime", "onnxruntime-gpu") if _dist_version(d)]
    providers = _ort_providers()
    gpu = gpu_info()
    report: Dict[str, Any] = {
        "versions": versions,
        "platform": f"{platform.system()} {platform.machine()}",
        "onnxruntime_providers": providers,
        "onnxruntime_distributions": ort_dists,
        "gpu": gpu.to_dict() if gpu else None,
        "host_memory": _host_memory(),
    }
    report["rtx_targets"] = _rtx_targets() if versions["tensorrt_rtx"] else []
    report["can"] = capabilities(versions, providers, gpu, report["rtx_targets"])
    report["openvino"] = openvino_report()
    notes = []
    if len(ort_dists) > 1:
        notes.append("both onnxruntime and onnxruntime-gpu are installed: they shadow each other; "
                     "uninstall both and install one")
    if gpu is None and versions["tensorrt"]:
        notes.append("tensorrt is installed but no GPU is visible")
    if versions["tensorrt_rtx"] and gpu is None:
        notes.append("TensorRT for RTX builds engines here without a GPU (ahead of time, for SM "
                     f"{', '.join(report['rtx_targets'])}); they run (JIT) on one of those GPUs")
    report["support_matrix"] = trt_support.support_matrix()
    report["engines_for_this_gpu"] = None
    if gpu is not None:
        serving = trt_support.serving_flavours(gpu.sm)
        report["engines_for_this_gpu"] = {"sm": gpu.sm, "flavours": serving,
                                          "installed": [k for k in serving if versions[trt_support.flavour(k).module]]}
        for key in trt_support.AUTO_ORDER:
            if versions[trt_support.flavour(key).module] and key not in serving:
                notes.append(trt_support.cannot_run_reason(key, gpu.sm))
        if serving and not report["engines_for_this_gpu"]["installed"]:
            notes.append(f"engines for this GPU come from {' or '.join(trt_support.flavour(k).label for k in serving)}, "
                         f"which is not installed here: {trt_support.fix_line(gpu.sm)}")
    report["notes"] = notes
    return report


def _rtx_targets() -> List[str]:
    try:
        from . import trt_support
        return trt_support.rtx_targets(trt_support.import_trt("rtx"))
    except Exception:
        return []


def capabilities(versions: Dict[str, Optional[str]], providers: List[str],
                 gpu: Optional[GpuInfo], rtx_targets: Optional[List[str]] = None) -> Dict[str, bool]:
    have = {k: bool(v) for k, v in versions.items()}
    cuda = have.get("cuda-python", False) and gpu is not None
    return {
        "export": have["torch"] and have["open_clip"] and have["onnx"],
        "build_fp16_onnx": have["onnx"],
        # enterprise TensorRT builds on the GPU the engine is for; RTX builds ahead of time on any machine
        "build_engines_tensorrt": have["tensorrt"] and have.get("polygraphy", False) and gpu is not None,
        "build_engines_rtx": have.get("tensorrt_rtx", False) and have.get("polygraphy", False),
        "run_ort_cpu": "CPUExecutionProvider" in providers,
        "run_ort_cuda": "CUDAExecutionProvider" in providers and gpu is not None,
        "run_ort_trt": "TensorrtExecutionProvider" in providers and gpu is not None,
        "run_engines_tensorrt": have["tensorrt"] and cuda and trt_support.runs_on("tensorrt", gpu.sm),
        "run_engines_rtx": have.get("tensorrt_rtx", False) and cuda and trt_support.runs_on("rtx", gpu.sm),
    }


_CAN_TEXT = {
    "export": "export ONNX graphs (clipfuse export)        needs torch, open_clip, onnx",
    "build_fp16_onnx": "build FP16 ONNX (clipfuse build --dry-run)   needs onnx",
    "build_engines_tensorrt": "build TensorRT engines (--trt tensorrt)     needs tensorrt + polygraphy + a GPU",
    "build_engines_rtx": "build TensorRT-RTX engines (--trt rtx)     needs tensorrt-rtx + polygraphy (CPU-only AOT counts)",
    "run_ort_cpu": "run on ONNX Runtime CPU (--backend ort-cpu) needs onnxruntime",
    "run_ort_cuda": "run on ONNX Runtime CUDA (ort-cuda)         needs onnxruntime-gpu + a GPU",
    "run_ort_trt": "run on ONNX Runtime TensorRT EP (ort-trt)   needs onnxruntime-gpu + TensorRT",
    "run_engines_tensorrt": "run TensorRT engines (--backend tensorrt)   needs tensorrt + cuda-python + a GPU it serves",
    "run_engines_rtx": "run TensorRT-RTX engines (--backend tensorrt) needs tensorrt-rtx + cuda-python + an RTX GPU (SM 75-89, 120, 121; not Hopper, not Jetson)",
}


def _gib(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / (1 << 30):.1f} GiB"


def format_report(report: Dict[str, Any]) -> str:
    lines = ["versions:"]
    for name, ver in report["versions"].items():
        lines.append(f"  {name:<12} {ver or 'not installed'}")
    providers = report["onnxruntime_providers"]
    lines.append(f"onnxruntime providers: {', '.join(providers) if providers else '(onnxruntime not installed)'}")
    gpu = report["gpu"]
    if gpu:
        lines.append(f"GPU: {gpu['name']} (SM {gpu['sm']}), {_gib(gpu['free_bytes'])} free of "
                     f"{_gib(gpu['total_bytes'])}, {gpu['driver'] or 'driver ?'} [via {gpu['source']}]")
    else:
        lines.append("GPU: none visible (no CUDA device through cuda-python or nvidia-smi)")
    mem = report["host_memory"]
    lines.append(f"host memory: {_gib(mem['available_bytes'])} available of {_gib(mem['total_bytes'])}")
    lines.append(f"platform: {report['platform']}, python {sys.executable}")
    lines.append("what clipfuse can do here:")
    for key, ok in report["can"].items():
        lines.append(f"  [{'yes' if ok else ' no'}] {_CAN_TEXT[key]}")
    here = report.get("engines_for_this_gpu")
    if here:
        flavours = ", ".join(trt_support.flavour(k).label + ("" if k in here["installed"] else " (not installed)")
                             for k in here["flavours"]) or "none"
        lines.append(f"engines for this GPU ({trt_support.gpu_label(here['sm'])}): {flavours}")
    lines += format_openvino(report.get("openvino"))
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# OpenVINO and the CPU's low-precision instructions (the openvino backend's precision choice)
# ---------------------------------------------------------------------------------------------
# /proc/cpuinfo flag -> what it means for OpenVINO's CPU plugin
CPU_FLAGS = {
    "avx512_bf16": "AVX-512 BF16 (bf16 dot products)",
    "amx_bf16": "AMX BF16 (bf16 tile matmuls)",
    "amx_int8": "AMX INT8",
    "avx512_vnni": "AVX-512 VNNI (int8 dot products)",
    "avx_vnni": "AVX-VNNI (int8 dot products, 256-bit)",
    "avx512_fp16": "AVX-512 FP16",
}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[Dict[str, bool]]:
    """Which of CPU_FLAGS the CPU has; None where /proc/cpuinfo is not readable (not Linux)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            flags = set()
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return None
    return {flag: flag in flags for flag in CPU_FLAGS}


def openvino_report() -> Dict[str, Any]:
    """OpenVINO's version, devices (name, capabilities) and the CPU's BF16/AMX/VNNI flags."""
    out: Dict[str, Any] = {"version": None, "devices": [], "cpu_flags": cpu_flags(), "error": None}
    try:
        import openvino
        core = openvino.Core()
        out["version"] = openvino.get_version()
        for device in core.available_devices:
            entry: Dict[str, Any] = {"name": device}
            for key in ("FULL_DEVICE_NAME", "OPTIMIZATION_CAPABILITIES"):
                try:
                    value = core.get_property(device, key)
                    entry[key.lower()] = [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
                except Exception:
                    entry[key.lower()] = None
            out["devices"].append(entry)
    except ImportError:
        pass
    except Exception as exc:  # a broken install is reported, never raised
        out["error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    return out


def format_openvino(info: Optional[Dict[str, Any]]) -> List[str]:
    if not info:
        return []
    if info["version"] is None:
        lines = ["OpenVINO: not installed (pip install 'clipfuse[openvino]' for --backend openvino)"
                 + (f"; import failed: {info['error']}" if info.get("error") else "")]
    else:
        lines = [f"OpenVINO {info['version']}, devices:"]
        for dev in info["devices"]:
            caps = ", ".join(dev.get("optimization_capabilities") or []) or "?"
            lines.append(f"  {dev['name']:<6} {dev.get('full_device_name') or '?'} [{caps}]")
        if not info["devices"]:
            lines.append("  (none)")
    flags = info.get("cpu_flags")
    if flags is None:
        lines.append("CPU low-precision instructions: unknown (/proc/cpuinfo not readable)")
    else:
        have = [CPU_FLAGS[f] for f, ok in flags.items() if ok]
        lines.append(f"CPU low-precision instructions: {', '.join(have) if have else 'none of BF16/AMX/VNNI'}")
    return lines
