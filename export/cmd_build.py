"""`clipfuse build`: FP16 ONNX (FP32 islands) + graph checks + TensorRT engine + manifests."""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from clipfuse.runtime.cliargs import float_range

HELP = "make the FP16 graph and build a TensorRT engine (or plan it with --dry-run)"
DESCRIPTION = """\
Build a TensorRT engine from an exported graph engines/NAME.onnx (+ NAME.json).

--precision fp16 first writes NAME.fp16.onnx + NAME.fp16.json: every tensor FP16 except the FP32
islands (LayerNorm, softmax, L2 norms, the cosine classifier, CLIP-DINOiser's pooling), with
explicit Casts and unchanged I/O dtypes (uint8 image in, float32 scores out). The engine is then
built STRONGLY TYPED from that graph (TensorRT 10.x and 11.x); TensorRT 8.6 gets the weak-typed
FP16 flag on the FP32 graph instead. Graph checks run first and refuse a graph TensorRT cannot
build well (unsupported op, FP16 LayerNorm, attention scaled after QK^T, dynamic H/W).

The engine is named after everything it is tied to, e.g.
  engines/NAME.trt10.3-sm87-fp16-b1_4_16-1a2b3c4d.engine  (+ .json manifest)
and the equivalent trtexec command is printed and stored in the manifest, for building on the
device itself (e.g. a Jetson) from the FP16 ONNX.

examples:
  clipfuse build engines/sclip.onnx --precision fp16 --batch 1:4:16
  clipfuse build engines/sclip.onnx --dry-run --target-trt 10.3 --target-sm 87   # plan for a Jetson Orin
  clipfuse build engines/naclip.onnx --precision fp32 --workspace-gb 2 --opt-level 5
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", help="the exported FP32 graph, e.g. engines/sclip.onnx (its NAME.json beside it)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                        help="engine precision (default: fp16)")
    parser.add_argument("--batch", default="1:4:16", metavar="MIN:OPT:MAX",
                        help="optimization profile on the batch axis (default: 1:4:16)")
    parser.add_argument("--classes", default="1:32:256", metavar="MIN:OPT:MAX",
                        help="profile on the class axis of a dynamic-vocabulary graph's class_embeddings "
                             "input (default: 1:32:256; ignored for baked vocabularies)")
    parser.add_argument("--workspace-gb", type=float_range(0.0, 1024.0, low_open=True), default=4.0,
                        help="TensorRT workspace memory pool limit in GiB (default: 4; use 1-2 on 8 GB Jetsons)")
    parser.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), metavar="0-5",
                        help="builder optimization level 0-5 (default: 3; higher = longer build, maybe faster)")
    parser.add_argument("--timing-cache", default=None, metavar="PATH",
                        help="timing cache file, read and updated (default: engines dir/timing.trtX.Y-smNN.cache)")
    parser.add_argument("--dry-run", action="store_true",
                        help="do everything but the TensorRT build: checks, FP16 ONNX, planned engine name and "
                             "trtexec line (works without TensorRT or a GPU)")
    parser.add_argument("--target-trt", default=None, metavar="X.Y",
                        help="with --dry-run: TensorRT version of the target device (default: the installed one)")
    parser.add_argument("--target-sm", default=None, metavar="NN",
                        help="with --dry-run: GPU SM of the target device, e.g. 87 for Orin (default: this GPU)")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import onnx

    from clipfuse.runtime.artifact import contract_sha256, open_artifact
    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.fileio import sha256_file
    from clipfuse.runtime.manifest import manifest_path_for, write_manifest

    from . import graph_checks, trt_build
    from .artifacts import write_contract
    from .fp16 import convert_file

    src = Path(args.onnx)
    if src.suffix != ".onnx" or not src.is_file():
        raise ClipfuseError(f"{src} is not an .onnx file (pass the exported FP32 graph, e.g. engines/sclip.onnx)")
    if src.name.endswith(".fp16.onnx"):
        raise ClipfuseError(f"{src.name} is already an FP16 graph; pass the FP32 graph it came from")
    # the same checks as every reader (hash, contract in the graph): never launder a mismatched pair
    manifest = open_artifact(src, what="graph").manifest
    if manifest.get("precision", "fp32") != "fp32":
        raise ClipfuseError(f"{src.name}: manifest precision is {manifest.get('precision')!r}, expected fp32")
    batch = trt_build.BatchProfile.parse(args.batch)
    classes = trt_build.BatchProfile.parse(args.classes)
    if args.workspace_gb <= 0:
        raise ClipfuseError("--workspace-gb must be > 0")
    workspace_bytes = int(args.workspace_gb * (1 << 30))
    if not args.dry_run and (args.target_trt or args.target_sm):
        raise ClipfuseError("--target-trt/--target-sm plan for another device: use them with --dry-run")

    _check(graph_checks, onnx.load(str(src)), src.name)
    src_sha = sha256_file(src)

    # Which TensorRT / GPU the engine is for.
    trt_version, sm, gpu_name = args.target_trt, args.target_sm, None
    if not args.dry_run or trt_version is None or sm is None:
        trt_version, sm, gpu_name = _detect(trt_version, sm, required=not args.dry_run)
    # TensorRT < 10 (8.6) has no strong typing: FP16 there is the weak-typed builder flag.
    legacy = trt_version is not None and trt_build.trt_major(trt_version) < 10
    weak = args.precision == "fp16" and legacy

    build_onnx, build_manifest = src, manifest
    if args.precision == "fp16":
        dst = src.with_name(src.name[:-len(".onnx")] + ".fp16.onnx")
        _say(f"writing FP16 graph {dst} ...")
        report = convert_file(src, dst)
        write_contract(dst, manifest)  # the FP16 graph describes itself like its source
        _check(graph_checks, onnx.load(str(dst)), dst.name)
        fp16_manifest = copy.deepcopy(manifest)
        fp16_manifest.update(precision="fp16", onnx_file=dst.name, onnx_sha256=sha256_file(dst),
                             source_onnx_sha256=manifest.get("onnx_sha256") or src_sha,
                             fp16=report.to_dict())
        print(f"FP16 graph: {dst} ({report.fp32_nodes}/{report.nodes} nodes kept FP32, "
              f"{report.casts_inserted} casts)")
        if not weak:
            build_onnx, build_manifest = dst, fp16_manifest
        else:
            _say(f"TensorRT {trt_version} < 10: weak-typed FP16 build from the FP32 graph")

    onnx_sha = sha256_file(build_onnx)
    stem = src.name[:-len(".onnx")]
    if trt_version and sm:
        engine = src.with_name(trt_build.engine_file_name(stem, trt_version, sm, args.precision, batch, onnx_sha))
        cache_default = src.with_name(trt_build.timing_cache_name(trt_version, sm))
    else:
        engine = src.with_name(f"{stem}.trt<X.Y>-sm<NN>-{args.precision}-{batch.tag()}-{onnx_sha[:8]}.engine")
        cache_default = src.with_name("timing.trt<X.Y>-sm<NN>.cache")
    timing_cache = Path(args.timing_cache) if args.timing_cache else cache_default
    profiles = trt_build.input_profiles(trt_build.graph_inputs(build_onnx), batch, classes)
    trtexec = trt_build.trtexec_command(build_onnx, engine, profiles, timing_cache, workspace_bytes,
                                        args.opt_level, strongly_typed=not legacy, weak_fp16=weak)
    if args.precision == "fp16":
        # the plan travels with the FP16 graph: on the device, run its trtexec line
        fp16_manifest["engine_plan"] = {"file": engine.name, "trtexec": trtexec, "tensorrt_version": trt_version,
                                        "sm": sm, "batch_profile": [batch.min, batch.opt, batch.max]}
        write_manifest(manifest_path_for(dst), fp16_manifest)
    print(f"engine: {engine}")
    print(f"trtexec equivalent:\n  {trtexec}")

    if args.dry_run:
        if not (trt_version and sm):
            print("(no TensorRT/GPU here: pass --target-trt and --target-sm to name the engine for a device)")
        print("dry run: no engine built")
        return 0

    _say(f"building {engine.name} (TensorRT {trt_version}, SM {sm}, {args.precision}, batch {batch}) ...")
    facts = trt_build.build_engine(build_onnx, engine, precision=args.precision, profiles=profiles,
                                   workspace_bytes=workspace_bytes, opt_level=args.opt_level,
                                   timing_cache=timing_cache)
    engine_manifest = copy.deepcopy(build_manifest)
    engine_manifest["engine"] = engine_section(
        engine=engine, engine_sha256=str(facts["engine_sha256"]), tensorrt_version=str(facts["tensorrt_version"]),
        sm=sm, gpu_name=gpu_name, precision=args.precision, batch=batch, onnx_sha256=onnx_sha,
        trtexec=trtexec, workspace_bytes=workspace_bytes, opt_level=args.opt_level, timing_cache=timing_cache)
    engine_manifest["engine"]["build_seconds"] = facts["build_seconds"]
    engine_manifest["engine"]["contract_sha256"] = contract_sha256(engine_manifest)  # engines keep no metadata
    write_manifest(manifest_path_for(engine), engine_manifest)
    print(f"wrote {engine} and {manifest_path_for(engine).name} in {facts['build_seconds']} s")
    return 0


def engine_section(*, engine: Path, engine_sha256: str, tensorrt_version: str, sm: str,
                   gpu_name, precision: str, batch, onnx_sha256: str, trtexec: str,
                   workspace_bytes: int, opt_level: int, timing_cache: Path) -> dict:
    """manifest["engine"]: what the runtime checks before loading (TRT version, SM)."""
    from .trt_build import normalise_sm

    return {"file": engine.name, "sha256": engine_sha256, "tensorrt_version": tensorrt_version,
            "sm": normalise_sm(sm), "gpu_name": gpu_name, "precision": precision,
            "batch_profile": [batch.min, batch.opt, batch.max], "onnx_sha256": onnx_sha256,
            "trtexec": trtexec, "workspace_bytes": workspace_bytes, "opt_level": opt_level,
            "timing_cache": timing_cache.name}


def _check(graph_checks, model, label: str) -> None:
    from clipfuse.runtime.errors import ClipfuseError

    messages = graph_checks.run_checks(model)
    for m in messages:
        _say(f"  {label}: {m}")
    if messages:
        raise ClipfuseError(f"{label} fails {len(messages)} build check(s) (listed above); not building")


def _detect(trt_version, sm, required: bool):
    """(TensorRT version, SM, GPU name) of this machine; explicit values win."""
    from clipfuse.runtime.doctor import gpu_info
    from clipfuse.runtime.errors import ClipfuseError

    gpu_name = None
    if trt_version is None:
        try:
            import tensorrt  # type: ignore
            trt_version = tensorrt.__version__
        except Exception:
            if required:
                from .trt_build import import_tensorrt
                import_tensorrt()  # raises the one-line "TensorRT is not usable here" error
    info = gpu_info()
    if info is not None:
        gpu_name = info.name
        sm = sm or info.sm
    elif required:
        raise ClipfuseError("no CUDA GPU visible (cuda-python / nvidia-smi): engines are built on the GPU "
                            "they run on; use --dry-run here and trtexec on the device")
    return trt_version, sm, gpu_name
