"""`clipfuse bench`: latency/throughput of every backend against the PyTorch reference."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipfuse.runtime.cliargs import non_negative_float, non_negative_int, on_off, positive_int

ORDER = 80  # place in `clipfuse --help`
HELP = "time every backend (PyTorch reference, fused torch, ONNX Runtime, TensorRT) on one head"
DESCRIPTION = """\
Benchmark a head at one or more input sizes and batch sizes on every backend this machine has, all
over the same weights and vocabulary, against the PyTorch reference (clipfuse.export.reference,
eager FP32), which every speed-up is relative to.

For each (size, head) the graph is exported once (random weights with --pretrained none are exact
for speed), then every backend is opened, its output checked against the reference on one image
(max|d| in the report) and warmed up (calls discarded); the timed calls then run INTERLEAVED, one
call per backend per round with the starting backend rotating, so load drifting on a shared
machine hits every backend alike. Each timed call ends with the backend's synchronisation (CUDA
events for torch on GPU). Reported per (backend, batch):
p50/p90/p99/mean latency per call, images/s, peak host RSS (VmHWM, reset per measurement), peak
device memory (GPU), speed-up vs the reference, and the fraction of the FLOP floor (analytic FLOPs
of the call / measured peak of a large matmul: FP32 on CPU, FP16 and FP32 on GPU).

scopes:
  model  the batch is already where the backend wants it (host array, CUDA tensor, bound OrtValue,
         engine buffer); one graph call per timed iteration
  e2e    per iteration: decode a JPEG (--image, default a synthetic 640x480 photo) -> the method's
         sliding-window protocol with --batch windows per call -> label map (Segmenter) -> PNG;
         also reports the median time per stage (decode, resize, windows, model, protocol, write);
         then a frame graph of the image's size (the whole protocol in the graph: the host only
         decodes and writes) on every GPU backend (--frame-graphs), with its model-only
         throughput, e2e / model-only and host share against the targets (>= 50 %, <= 10 %)

backends (--backends takes names and/or the sets cpu, gpu, all; unavailable ones are recorded as
skipped with the reason, failing ones as failed). Each bench name maps, in one table
(benchmarks/backends.py), to the runtime backend that runs it (the --backend names of clipfuse
run, in brackets), the graph it opens with that graph's own manifest, and its options; the torch
rows have no runtime backend and run in the bench:
  torch-ref            PyTorch reference, eager FP32 (the baseline)
  torch-fused          clipfuse's fused torch module, eager FP32
  torch-ref-fp16, torch-fused-fp16       CUDA FP16 autocast (GPU only)
  torch-compile, torch-compile-fp16      torch.compile of the fused module (failures recorded)
  ort-cpu-fp32, ort-cpu-fp16             [ort-cpu] FP32 graph / FP16 graph (the one FP16 path of clipfuse build)
  ort-cuda-fp32, ort-cuda-fp16           [ort-cuda] device-resident IOBinding (onnxruntime-gpu)
  ort-cuda-fp16-graph                    the same, replayed as a CUDA graph
  ort-trt-fp32, ort-trt-fp16             [ort-trt] FP32 graph, FP16 kernels for -fp16 (engine cache in the work folder)
  tensorrt-fp16, tensorrt-fp16-graph     [tensorrt] engine built with `clipfuse build` (+ CUDA graph)
  openvino-fp32, openvino-bf16           [openvino] CPU at an explicit precision (openvino extra); bf16 is
                                         timed for every head, also those the runtime refuses it for
  cpu = torch-ref,torch-fused,ort-cpu-fp32,ort-cpu-fp16   gpu = the GPU ones + torch-ref/torch-fused
  openvino = openvino-fp32,openvino-bf16 (e.g. --backends cpu,openvino)

writes OUT.json (every raw sample, machine, versions, git commit, load averages before/after each
measurement), OUT.md (tables) and OUT-SIZE.png (latency and throughput vs batch per backend).

examples:
  clipfuse bench --head sclip --size 224 --batch 1,4 -o benchmarks/results/sclip-cpu
  clipfuse bench --head all --size 224,448 --batch 1,4 --backends cpu --warmup 2 --iters 10 \\
      --max-seconds 30 -o benchmarks/results/cpu-vitb16
  clipfuse bench --head naclip --backends gpu --batch 1,2,4,8,16,32 --torch-device cuda -o results/h100
  clipfuse bench --head sclip --scope e2e --image photo.jpg --batch 4 -o /tmp/e2e
  clipfuse bench --head all --size 448 --batch 1 --warmup 1 --iters 3 --append -o benchmarks/results/cpu-vitb16
  clipfuse bench --render-only -o benchmarks/results/cpu-vitb16     # redo .md/.png from the .json
"""


def _int_list(text: str):
    from clipfuse.runtime.errors import ClipfuseError
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ClipfuseError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ClipfuseError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to measure")
    what.add_argument("--head", default="sclip",
                      help="head(s), comma-separated, or 'all' (every head of `clipfuse heads`) "
                           "(default: %(default)s)")
    what.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: %(default)s)")
    what.add_argument("--pretrained", default="none",
                      help="weights: 'none' = seeded random init (exact for timing), an open_clip tag or a "
                           "checkpoint file (default: %(default)s)")
    what.add_argument("--heads-ckpt", default=None, help="CLIP-DINOiser heads checkpoint (default: random heads)")
    what.add_argument("--quick-gelu", type=on_off, default=None, metavar="on|off",
                      help="activation of a checkpoint file's weights (on = QuickGELU, OpenAI); needed for "
                           "open_clip-format files, which do not record it")
    what.add_argument("--size", default="224", help="input size(s) S of the graph, comma-separated (default: %(default)s)")
    what.add_argument("--batch", default="1,4",
                      help="batch sizes, comma-separated; in e2e scope: windows per backend call (default: %(default)s)")
    what.add_argument("--backends", default="cpu",
                      help="backend names and/or sets cpu, gpu, openvino, all, comma-separated (default: %(default)s)")
    what.add_argument("--scope", choices=("model", "e2e"), default="model",
                      help="model: one graph call on resident input; e2e: JPEG decode -> protocol -> labels "
                           "(default: %(default)s)")
    what.add_argument("--classes", default=None,
                      help="class names 'a,b,c' or 'bg;person,people;car' (default: the 21 VOC classes)")
    what.add_argument("--classes-file", default=None, help="file with one class per line (synonyms comma-separated)")
    what.add_argument("--templates", choices=("single", "imagenet80"), default="single",
                      help="prompt templates for the class embeddings; no effect on speed (default: %(default)s)")
    what.add_argument("--frame-graphs", choices=("gpu", "all", "off"), default="gpu",
                      help="e2e scope: time a frame graph of the image's size on the GPU backends (gpu), also "
                           "on ONNX Runtime CPU (all), or not (off) (default: %(default)s)")
    what.add_argument("--image", default=None, help="e2e scope: input image (default: synthetic 640x480 JPEG)")
    how = parser.add_argument_group("how to measure")
    how.add_argument("--warmup", type=non_negative_int, default=2,
                     help="untimed calls first (at least 1; cut after the first once half of --max-seconds "
                          "is spent) (default: %(default)s)")
    how.add_argument("--iters", type=positive_int, default=10,
                     help="timed calls per measurement (default: %(default)s)")
    how.add_argument("--max-seconds", type=non_negative_float, default=60.0,
                     help="cap on the timed phase per backend (the interleaved rounds stop after this x the "
                          "number of backends); at least --min-iters calls still run; 0 = no cap "
                          "(default: %(default)s)")
    how.add_argument("--min-iters", type=positive_int, default=3,
                     help="timed calls even past the cap (default: %(default)s)")
    how.add_argument("--threads", type=positive_int, default=None,
                     help="CPU threads for torch and ONNX Runtime (default: all logical CPUs)")
    how.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where the torch backends run; auto = cuda if visible (default: %(default)s)")
    how.add_argument("--no-peak", action="store_true", help="skip measuring the device's matmul peak")
    how.add_argument("--seed", type=non_negative_int, default=0,
                     help="seed of random weights and inputs (default: %(default)s)")
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--out", required=True,
                     help="output stem: writes OUT.json, OUT.md and OUT-SIZE.png")
    out.add_argument("--workdir", default=None,
                     help="keep the exported graphs here (default: a temp folder, deleted)")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    out.add_argument("--render-only", action="store_true", help="re-render OUT.md and plots from OUT.json and exit")
    out.add_argument("--append", action="store_true",
                     help="add this run's measurements to an existing OUT.json (same model and scope; its "
                          "settings are recorded under 'runs'; records of the same head/size/batch/backend "
                          "are replaced), e.g. a second size with fewer iterations, or a re-run")


def _heads(text: str):
    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.methods import METHODS
    heads = list(METHODS) if text.strip() == "all" else [h.strip() for h in text.split(",") if h.strip()]
    bad = [h for h in heads if h not in METHODS]
    if bad or not heads:
        raise ClipfuseError(f"unknown head(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)} or all")
    return heads


def _classes(args):
    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.vocab import parse_classes, read_classes_file
    if args.classes and args.classes_file:
        raise ClipfuseError("give --classes or --classes-file, not both")
    if args.classes:
        return parse_classes(args.classes)
    if args.classes_file:
        return read_classes_file(args.classes_file)
    import clipfuse.runtime.data as data
    return read_classes_file(Path(data.__file__).parent / "classnames" / "voc21.txt")


def run(args: argparse.Namespace) -> int:
    import os

    from clipfuse.runtime.errors import ClipfuseError

    stem = Path(args.out[:-5] if args.out.endswith(".json") else args.out)
    if args.render_only:
        from ..report import read_json
        from ..session import render
        render(read_json(Path(f"{stem}.json")), stem, not args.no_plots)
        return 0
    if args.warmup < 0 or args.iters < 1 or args.min_iters < 1:
        raise ClipfuseError("--warmup must be >= 0, --iters and --min-iters >= 1")
    from ..backends import parse_backends
    heads = _heads(args.head)
    sizes, batches = _int_list(args.size), _int_list(args.batch)
    backends = parse_backends(args.backends)
    classes = _classes(args)
    if args.image and not Path(args.image).is_file():
        raise ClipfuseError(f"image not found: {args.image}")
    if stem.parent.exists() and not stem.parent.is_dir():
        raise ClipfuseError(f"output folder {stem.parent} is not a directory")

    import torch  # heavy imports only once the arguments are known to be good

    from ..session import run_bench
    from ..suite import BenchConfig

    device = args.torch_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ClipfuseError("--torch-device cuda: torch sees no CUDA GPU")
    threads = args.threads or os.cpu_count() or 1
    cfg = BenchConfig(heads=heads, model=args.model, pretrained=args.pretrained, sizes=sizes, batches=batches,
                      backends=backends, scope=args.scope, warmup=args.warmup, iters=args.iters,
                      max_seconds=args.max_seconds or None, min_iters=args.min_iters, threads=threads,
                      classes=classes, templates=args.templates, heads_ckpt=args.heads_ckpt, seed=args.seed,
                      quick_gelu=args.quick_gelu,
                      torch_device=device, image=args.image, workdir=args.workdir, frame_graphs=args.frame_graphs)
    doc = run_bench(cfg, stem, append=args.append, measure_peak=not args.no_peak, plots=not args.no_plots)
    ok = sum(r.get("status") == "ok" for r in doc["results"])
    print(f"clipfuse bench: {ok} measurements; wrote {stem}.json, {stem}.md", file=sys.stderr)
    return 0
