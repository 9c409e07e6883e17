"""`clipfuse build`: parses arguments and calls clipfuse.export.build.build."""
from __future__ import annotations

import argparse
from pathlib import Path

from clipfuse.runtime.cliargs import float_range

ORDER = 40  # place in `clipfuse --help`
HELP = "make the FP16 graph and build a TensorRT / TensorRT-RTX engine (or plan it with --dry-run)"
DESCRIPTION = """\
Build a TensorRT engine from an exported graph engines/NAME.onnx (+ NAME.json).

--precision fp16 first writes NAME.fp16.onnx + NAME.fp16.json: every tensor FP16 except the FP32
islands (LayerNorm, softmax, L2 norms, the cosine classifier, CLIP-DINOiser's pooling), with
explicit Casts and unchanged I/O dtypes (uint8 image in, float32 scores out). The engine is then
built STRONGLY TYPED from that graph. Graph checks run first and refuse a graph TensorRT cannot
build well (unsupported op, UInt8 not straight into a Cast, FP16 LayerNorm, attention scaled after
QK^T, dynamic H/W).

Two TensorRT flavours (--trt; default: whichever imports here, enterprise first):
  tensorrt  NVIDIA TensorRT 10.x/11.x (8.6: weak-typed FP16 flag on the FP32 graph), on the GPU the
            engine runs on (Jetson, server); timing cache beside the engine.
  rtx       TensorRT for RTX (pip install tensorrt-rtx-cu13): builds ahead of time WITHOUT a GPU for
            a list of compute capabilities (--target-sm 86 --target-sm 89; default: all it supports
            except opt-in Turing); the engine is JIT-specialised on its first run. It runs on
            RTX-architecture GPUs only (SM 75 opt-in, 80, 86, 89, 120, 121), not on Hopper
            (H100/H200), data-centre Blackwell or Jetson: those need `--trt tensorrt`.

On a machine with a GPU the engine must run on that GPU: --trt auto takes the installed flavour
that serves it, and a build nobody here could run is refused with what to do instead (install
TensorRT, or run the ONNX graph with --backend ort-cuda); --allow-foreign-gpu builds it anyway,
for other machines. `clipfuse doctor` prints the flavour x GPU table.

The engine is named after everything it is tied to, e.g.
  engines/NAME.trt10.3-sm87-fp16-b1_4_16-1a2b3c4d.engine        (+ .json manifest)
  engines/NAME.rtx1.7-sm80_86_89_120_121-fp16-b1_4_16-1a2b3c4d.engine
and the equivalent trtexec (or polygraphy) command is printed and stored in the manifest.

examples:
  clipfuse build engines/sclip.onnx --trt rtx                          # works on any machine
  clipfuse build engines/sclip.onnx --precision fp16 --batch 1:4:16   # on the target device
  clipfuse build engines/sclip.onnx --dry-run --trt tensorrt --target-trt 10.3 --target-sm 87   # plan a Jetson Orin build
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", help="the exported FP32 graph, e.g. engines/sclip.onnx (its NAME.json beside it)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                        help="engine precision (default: fp16)")
    parser.add_argument("--trt", choices=("auto", "tensorrt", "rtx"), default="auto",
                        help="TensorRT flavour (default auto: tensorrt if it imports, else tensorrt_rtx)")
    parser.add_argument("--batch", default="1:4:16", metavar="MIN:OPT:MAX",
                        help="optimization profile on axis 0 (images; masks/crops of refer graphs; "
                             "text rows) (default: 1:4:16)")
    parser.add_argument("--classes", default="1:32:256", metavar="MIN:OPT:MAX",
                        help="profile on the class axis of a dynamic-vocabulary graph's class_embeddings "
                             "input (default: 1:32:256; ignored for baked vocabularies)")
    parser.add_argument("--workspace-gb", type=float_range(0.0, 1024.0, low_open=True), default=4.0,
                        help="TensorRT workspace memory pool limit in GiB (default: 4; use 1-2 on 8 GB Jetsons)")
    parser.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), metavar="0-5",
                        help="builder optimization level 0-5 (default: 3; higher = longer build, maybe faster)")
    parser.add_argument("--timing-cache", default=None, metavar="PATH",
                        help="enterprise TensorRT: timing cache file, read and updated "
                             "(default: engines dir/timing.trtX.Y-smNN.cache)")
    parser.add_argument("--dry-run", action="store_true",
                        help="do everything but the TensorRT build: checks, FP16 ONNX, planned engine name and "
                             "trtexec/polygraphy line (works without TensorRT or a GPU)")
    parser.add_argument("--target-trt", default=None, metavar="X.Y",
                        help="with --dry-run: TensorRT version of the target device (default: the installed one)")
    parser.add_argument("--allow-foreign-gpu", action="store_true",
                        help="write the engine even when it cannot run on this machine's GPU (it is for "
                             "other GPUs); default: refuse, saying which flavour serves this GPU")
    parser.add_argument("--target-sm", action="append", default=None, metavar="NN",
                        help="GPU SM the engine is for, e.g. 87 for Orin; repeat for several TensorRT-RTX "
                             "targets (default: this GPU / all RTX targets)")


def run(args: argparse.Namespace) -> int:
    from clipfuse.runtime.artifact import open_artifact
    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.manifest import manifest_path_for

    from ..build import BuildOptions, build
    from ..trt_build import BatchProfile

    src = Path(args.onnx)
    if src.suffix != ".onnx" or not src.is_file():
        raise ClipfuseError(f"{src} is not an .onnx file (pass the exported FP32 graph, e.g. engines/sclip.onnx)")
    if src.name.endswith(".fp16.onnx"):
        raise ClipfuseError(f"{src.name} is already an FP16 graph; pass the FP32 graph it came from")
    if args.workspace_gb <= 0:
        raise ClipfuseError("--workspace-gb must be > 0")
    if not args.dry_run and args.target_trt:
        raise ClipfuseError("--target-trt plans for another device: use it with --dry-run")
    options = BuildOptions(
        precision=args.precision, batch=BatchProfile.parse(args.batch), classes=BatchProfile.parse(args.classes),
        trt=args.trt, workspace_bytes=int(args.workspace_gb * (1 << 30)), opt_level=args.opt_level,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        targets=tuple(args.target_sm or ()), target_version=args.target_trt, dry_run=args.dry_run,
        allow_foreign_gpu=args.allow_foreign_gpu)
    # the same checks as every reader (hash, contract in the graph): never launder a mismatched pair
    result = build(src, open_artifact(src, what="graph").manifest, options)

    if result.fp16_onnx is not None:
        print(f"FP16 graph: {result.fp16_onnx}")
    print(f"engine: {result.engine}")
    tool = "polygraphy" if result.flavour == "rtx" else "trtexec"
    print(f"{tool} equivalent:\n  {result.command}")
    if args.dry_run:
        if not (result.version and result.targets):
            print("(no TensorRT/GPU here: pass --trt, --target-trt and --target-sm to name the engine for a device)")
        print("dry run: no engine built")
        return 0
    print(f"wrote {result.engine} and {manifest_path_for(result.engine).name} in {result.build_seconds:.1f} s")
    return 0
