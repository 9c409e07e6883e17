"""The build pipeline as a library: FP32 graph -> checks -> FP16 graph -> TensorRT engine + manifest.

`build(onnx_path, manifest, BuildOptions(...))` is what `clipfuse build`, the benchmarks and the
tests call. It takes the graph's already-read manifest (the caller opens and verifies the
artifact) and writes NAME.fp16.onnx/.json (precision fp16) and the engine + its .json, each
atomically. `dry_run` stops before TensorRT: checks, FP16 graph, planned engine name and the
equivalent trtexec / polygraphy line.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from clipfuse.runtime import trt_support
from clipfuse.runtime.artifact import check_data_file, contract_sha256
from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.fileio import atomic_path, sha256_file
from clipfuse.runtime.manifest import manifest_path_for, parse_manifest, write_manifest

from . import graph_checks, trt_build
from .onnxio import graph_content_sha256
from .trt_build import BatchProfile, normalise_sm


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    batch: BatchProfile = BatchProfile(1, 4, 16)
    # class axis of a dynamic-vocabulary graph's class_embeddings input
    classes: BatchProfile = BatchProfile(1, 32, 256)
    # "tensorrt", "rtx", or None = whichever is importable (enterprise first)
    trt: Optional[str] = None
    workspace_bytes: int = 4 << 30
    opt_level: int = 3
    # enterprise TensorRT only (RTX has a runtime cache on the device instead)
    timing_cache: Optional[Path] = None
    # GPU SMs the engine is for: enterprise = exactly one (default: this GPU);
    # RTX = any of its compute capabilities (default: all it supports except opt-in Turing)
    targets: Tuple[str, ...] = ()
    # plan for another TensorRT release (dry runs only)
    target_version: Optional[str] = None
    dry_run: bool = False
    # write an engine that cannot run on this machine's GPU (it is for other machines)
    allow_foreign_gpu: bool = False


@dataclass
class BuildResult:
    flavour: Optional[str]
    version: Optional[str]
    targets: Tuple[str, ...]
    engine: Path                      # built, or planned (may hold <X.Y> placeholders in a dry run)
    command: str                      # trtexec / polygraphy line that builds the same engine
    fp16_onnx: Optional[Path] = None
    engine_manifest: Optional[dict] = None
    build_seconds: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    @property
    def built(self) -> bool:
        return self.engine_manifest is not None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def check_graph(model, label: str, log: Callable[[str], None] = _stderr) -> None:
    """Run the graph checks; one ClipfuseError line (each finding logged) when any fails."""
    messages = graph_checks.run_checks(model)
    for m in messages:
        log(f"  {label}: {m}")
    if messages:
        raise ClipfuseError(f"{label} fails {len(messages)} build check(s) (listed above); not building")


def _validate(options: BuildOptions) -> None:
    if options.precision not in trt_build.PRECISIONS:
        raise ClipfuseError(f"precision {options.precision!r}: choose one of {', '.join(trt_build.PRECISIONS)}")
    if options.workspace_bytes <= 0:
        raise ClipfuseError("workspace must be > 0")
    if not 0 <= options.opt_level <= 5:
        raise ClipfuseError("builder optimisation level must be 0..5")
    if not options.dry_run and options.target_version:
        raise ClipfuseError("a target TensorRT version plans for another device: use it with a dry run")
    if options.trt is not None and options.trt != "auto":
        trt_support.flavour(options.trt)


def _resolve_target(options: BuildOptions) -> Tuple[Optional[str], Optional[str], Tuple[str, ...], Optional[str]]:
    """(flavour, version, targets, gpu name): what the engine is for.

    On a machine with a GPU the engine must run on that GPU (trt_support.RUNS_ON), unless
    options.allow_foreign_gpu: an engine nobody here can run is refused with what to do instead."""
    from clipfuse.runtime.doctor import gpu_info

    targets = tuple(normalise_sm(t) for t in options.targets)
    auto = options.trt in (None, "auto")
    sm = None if options.dry_run else trt_support.device_sm()
    if options.dry_run and auto and options.target_version:
        # planning for a named release: TensorRT-RTX is 1.x, enterprise TensorRT 8.6 and later
        flavour = "rtx" if trt_build.trt_major(options.target_version) < 8 else "tensorrt"
    elif options.dry_run:
        flavour = options.trt if not auto else (trt_support.available() or [None])[0]
    else:
        flavour = trt_support.choose_for_device(options.trt, sm, options.allow_foreign_gpu)
        trt_support.import_trt(flavour)  # the one-line "not usable here, install X" before any work
    version = options.target_version or (trt_support.probe(flavour) if flavour else None)
    gpu = None
    if flavour == "rtx":
        if not targets and version and trt_support.probe("rtx"):
            known = trt_support.rtx_targets(trt_support.import_trt("rtx"))
            targets = tuple(t for t in known if t not in trt_support.RTX_DEFAULT_EXCLUDED)
        if targets and trt_support.probe("rtx"):
            known = trt_support.rtx_targets(trt_support.import_trt("rtx"))
            unknown = [t for t in targets if t not in known]
            if unknown:
                hint = "; ".join(f"{trt_support.gpu_label(t)} needs enterprise TensorRT (--trt tensorrt on that GPU) "
                                 "or --backend ort-cuda" for t in unknown if trt_support.runs_on("tensorrt", t))
                raise ClipfuseError(f"TensorRT for RTX {version} cannot target SM {', '.join(unknown)} "
                                    f"(it knows {', '.join(known)})" + (f": {hint}" if hint else ""))
        if sm is not None and targets and sm not in targets and trt_support.runs_on("rtx", sm) \
                and not options.allow_foreign_gpu:
            raise ClipfuseError(f"the engine would target SM {', '.join(targets)} but not this GPU ({trt_support.gpu_label(sm)}): "
                                f"add --target-sm {sm}, or pass --allow-foreign-gpu to build for other GPUs only")
        return flavour, version, targets, None
    if len(targets) > 1:
        raise ClipfuseError("enterprise TensorRT builds for one GPU: pass one --target-sm")
    if not targets or not options.dry_run:
        gpu = gpu_info() if sm is not None or options.dry_run else None
        if sm is not None:
            if targets and targets[0] != sm:
                raise ClipfuseError(f"--target-sm {targets[0]}: TensorRT builds for the GPU it runs on "
                                    f"(SM {sm}); plan other devices with --dry-run")
            targets = (sm,)
        elif gpu is not None:
            targets = (gpu.sm,)
        elif not options.dry_run:
            raise ClipfuseError("no CUDA GPU visible: enterprise TensorRT builds on the GPU the engine runs on; "
                                "use --trt rtx (builds without a GPU) or --dry-run and trtexec on the device")
    return flavour, version, targets, gpu.name if gpu else None


def fp16_graph(src: Path, manifest: dict, log: Callable[[str], None] = _stderr) -> Tuple[Path, dict]:
    """The one path from an FP32 graph to its FP16 graph: SRC.fp16.onnx with FP32 islands
    (export/fp16.py), the source's contract in its metadata, the graph checks; returns the path
    and its manifest (precision fp16, hashes, conversion report), which the caller writes."""
    import onnx

    from .fp16 import convert_file

    dst = src.with_name(src.name[:-len(".onnx")] + ".fp16.onnx")
    log(f"writing FP16 graph {dst} ...")
    fp16_manifest = copy.deepcopy(dict(manifest, precision="fp16"))
    # the FP16 graph describes itself (precision is in the contract), with its own file hashes
    report = convert_file(src, dst, manifest=fp16_manifest)
    check_graph(onnx.load(str(dst)), dst.name, log)
    fp16_manifest.update(source_onnx_sha256=parse_manifest(manifest, src.name).onnx_sha256 or sha256_file(src),
                         fp16=report.to_dict())
    log(f"FP16 graph: {dst} ({report.fp32_nodes}/{report.nodes} nodes kept FP32, {report.casts_inserted} casts)")
    return dst, fp16_manifest


def build(onnx_path: "str | Path", manifest: dict, options: BuildOptions = BuildOptions(),
          log: Callable[[str], None] = _stderr) -> BuildResult:
    """Build (or plan, with options.dry_run) the engine of the exported FP32 graph `onnx_path`,
    whose manifest the caller has read (and verified)."""
    import onnx

    src = Path(onnx_path)
    if src.name.endswith(".fp16.onnx"):
        raise ClipfuseError(f"{src.name} is already an FP16 graph; pass the FP32 graph it came from")
    precision = parse_manifest(manifest, manifest_path_for(src).name).precision
    if (precision or "fp32") != "fp32":
        raise ClipfuseError(f"{src.name}: manifest precision is {precision!r}, expected fp32")
    _validate(options)
    check_data_file(src, manifest, verify=False)   # a graph without its weights: one line, before any parse
    check_graph(onnx.load(str(src), load_external_data=False), src.name, log)   # the checks need no weights

    flavour, version, targets, gpu_name = _resolve_target(options)
    # Strong typing everywhere except enterprise TensorRT 8.6, where FP16 is the weak-typed flag.
    legacy = flavour == "tensorrt" and version is not None and trt_build.trt_major(version) < 10
    weak = options.precision == "fp16" and legacy

    build_onnx, build_manifest = src, manifest
    result_fp16 = None
    if options.precision == "fp16":
        dst, fp16_manifest = fp16_graph(src, manifest, log)
        result_fp16 = dst
        if weak:
            log(f"TensorRT {version} < 10: weak-typed FP16 build from the FP32 graph")
        else:
            build_onnx, build_manifest = dst, fp16_manifest

    # the name's hash covers the data file too: new weights in NAME.onnx.data make a new engine name
    onnx_sha, data_sha, content_sha = graph_content_sha256(build_onnx)
    stem = src.name[:-len(".onnx")]
    if flavour and version and targets:
        engine = src.with_name(trt_build.engine_file_name(stem, flavour, version, targets, options.precision,
                                                          options.batch, content_sha))
    else:
        prefix = trt_support.flavour(flavour).prefix if flavour else "<trt|rtx>"
        engine = src.with_name(f"{stem}.{prefix}<X.Y>-sm<NN>-{options.precision}-{options.batch.tag()}-"
                               f"{content_sha[:8]}.engine")
    timing_cache = None
    if flavour != "rtx":
        default_cache = (trt_build.timing_cache_name(version, targets[0]) if version and targets
                         else "timing.trt<X.Y>-sm<NN>.cache")
        timing_cache = Path(options.timing_cache) if options.timing_cache else src.with_name(default_cache)
    profiles = trt_build.input_profiles(trt_build.graph_inputs(build_onnx), options.batch, options.classes)
    if flavour == "rtx":
        command = trt_build.polygraphy_command(build_onnx, engine, profiles, targets or ("<NN>",),
                                               options.workspace_bytes, options.opt_level)
    else:
        command = trt_build.trtexec_command(build_onnx, engine, profiles, timing_cache, options.workspace_bytes,
                                            options.opt_level, strongly_typed=not legacy, weak_fp16=weak)
    result = BuildResult(flavour=flavour, version=version, targets=targets, engine=engine, command=command,
                         fp16_onnx=result_fp16)
    if options.precision == "fp16":
        # the plan travels with the FP16 graph: on the device, run its command line
        fp16_manifest.update(engine_plan={"file": engine.name, "command": command, "flavour": flavour,
                                          "tensorrt_version": version, "targets": list(targets),
                                          "batch_profile": [options.batch.min, options.batch.opt, options.batch.max]})
        write_manifest(manifest_path_for(result_fp16), fp16_manifest)
    if options.dry_run:
        return result

    label = trt_support.flavour(flavour).label
    log(f"building {engine.name} ({label} {version}, SM {', '.join(targets)}, {options.precision}, "
        f"batch {options.batch}) ...")
    start = time.perf_counter()
    engine_bytes, io = trt_build.build_engine_bytes(
        flavour, build_onnx, profiles=profiles, strongly_typed=not legacy, weak_fp16=weak,
        workspace_bytes=options.workspace_bytes, opt_level=options.opt_level, targets=targets,
        timing_cache=timing_cache)
    seconds = time.perf_counter() - start
    trt_build.check_io_contract(io, build_manifest, engine.name)
    engine_manifest = copy.deepcopy(build_manifest)
    section = engine_section(
        engine=engine, engine_sha256=_sha256_bytes(engine_bytes), flavour=flavour, version=version,
        targets=targets, gpu_name=gpu_name, precision=options.precision, batch=options.batch,
        onnx_sha256=onnx_sha, onnx_data_sha256=data_sha, command=command, workspace_bytes=options.workspace_bytes,
        opt_level=options.opt_level, timing_cache=timing_cache, strongly_typed=not legacy, io=io)
    section.update(build_seconds=round(seconds, 2))
    engine_manifest.update(engine=section)
    section.update(contract_sha256=contract_sha256(engine_manifest))  # engines keep no metadata
    # engine and manifest land together or not at all
    with atomic_path(engine) as tmp_engine, atomic_path(manifest_path_for(engine)) as tmp_json:
        tmp_engine.write_bytes(engine_bytes)
        write_manifest(tmp_json, engine_manifest)
    result.engine_manifest, result.build_seconds = engine_manifest, seconds
    return result


def _sha256_bytes(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def engine_section(*, engine: Path, engine_sha256: str, flavour: str, version: str, targets, gpu_name,
                   precision: str, batch: BatchProfile, onnx_sha256: str, command: str, workspace_bytes: int,
                   opt_level: int, timing_cache: Optional[Path], strongly_typed: bool = True,
                   io: Optional[Dict[str, list]] = None, onnx_data_sha256: Optional[str] = None) -> dict:
    """The manifest's `engine` section (runtime.manifest.EngineSection): what the runtime checks
    before loading (flavour, version, SMs, I/O).
    onnx_data_sha256 (only for a graph with a data file) is the hash of the weights it was built from."""
    section = {"file": engine.name, "sha256": engine_sha256, "flavour": flavour, "tensorrt_version": version,
               "targets": [normalise_sm(t) for t in targets], "gpu_name": gpu_name, "precision": precision,
               "strongly_typed": strongly_typed, "batch_profile": [batch.min, batch.opt, batch.max],
               "onnx_sha256": onnx_sha256, "command": command, "workspace_bytes": workspace_bytes,
               "opt_level": opt_level, "timing_cache": timing_cache.name if timing_cache else None,
               "io": io}
    if onnx_data_sha256:
        section["onnx_data_sha256"] = onnx_data_sha256
    return section
