"""End to end on a frame graph: the host only decodes (and writes the labels), the backend runs the
whole sliding-window protocol (clipfuse export --frame).

    python -m clipfuse.benchmarks.frame_e2e FRAME.onnx --backend ort-cuda --image photo.jpg --batch 8 -o OUT.json

Per backend, at one batch of frames:
* model only: frames already resident where the backend wants them (ort-cuda: device buffers,
  tensorrt: engine buffers), one launch + synchronize per timed call;
* e2e: per call, decode `batch` JPEGs, run the frame graph (host -> device -> labels -> host),
  write the labels of each frame as PNG (in memory).
Reported: p50 of both, frames/s, e2e / model-only throughput, host share (1 - model / e2e time),
and the targets (e2e >= 50 % of model-only, host share <= 10 %) as met / not met: numbers for the
benchmark report, never asserted in timed tests.
"""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

TARGET_E2E_OVER_MODEL = 0.5
TARGET_HOST_SHARE = 0.10


def _p50(samples: List[float]) -> float:
    return float(np.median(samples))


def measure(frame_graph: Path, backend: str, image: Path, batch: int, warmup: int = 3, iters: int = 20,
            max_seconds: float = 30.0, backend_options: Optional[dict] = None) -> Dict:
    """One backend on one frame graph (image graph for the engine path: pass the .engine)."""
    from PIL import Image

    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.imageio import read_image
    from clipfuse.runtime.segmenter import Segmenter

    with Segmenter.open(frame_graph, backend=backend, backend_options=backend_options or {}) as seg:
        if seg.frame_size is None:
            raise ClipfuseError(f"{frame_graph.name} is not a frame graph (clipfuse export --frame WxH)")
        h, w = seg.frame_size
        first = read_image(image)
        if first.shape[:2] != (h, w):
            raise ClipfuseError(f"{image} is {first.shape[1]}x{first.shape[0]}, the frame graph takes {w}x{h}")
        frames = np.repeat(first[None], batch, axis=0)
        be = seg.backend
        feeds = {"frames": frames, **seg._vocabulary_feeds()}

        def model_call():
            if hasattr(be, "stage") and hasattr(be, "launch"):
                be.launch()
                be.synchronize()
            else:
                be.run(feeds)

        if hasattr(be, "stage"):
            be.stage(feeds)

        def e2e_call():
            t0 = time.perf_counter()
            batch_frames = np.stack([read_image(image) for _ in range(batch)])
            t1 = time.perf_counter()
            out = seg.segment_frames(batch_frames)
            t2 = time.perf_counter()
            for labels in out["labels"]:
                Image.fromarray(labels.astype(np.uint8), mode="L").save(io.BytesIO(), format="PNG")
            t3 = time.perf_counter()
            return {"decode": t1 - t0, "model": t2 - t1, "write": t3 - t2}

        def timed(fn, n):
            samples, stages = [], []
            start = time.perf_counter()
            for i in range(n):
                t0 = time.perf_counter()
                st = fn()
                samples.append(time.perf_counter() - t0)
                if st:
                    stages.append(st)
                if i >= 2 and time.perf_counter() - start > max_seconds / 2:
                    break
            return samples, stages

        for _ in range(max(1, warmup)):
            e2e_call()
            if hasattr(be, "stage"):
                be.stage(feeds)   # e2e calls staged other buffers; model-only uses these
            model_call()
        model_s, _ = timed(model_call, iters)
        e2e_s, stages = timed(e2e_call, iters)
    model_p50, e2e_p50 = _p50(model_s), _p50(e2e_s)
    rec = {"graph": frame_graph.name, "backend": backend, "batch": batch, "frame": [w, h],
           "model_p50_s": round(model_p50, 6), "e2e_p50_s": round(e2e_p50, 6),
           "model_frames_per_s": round(batch / model_p50, 2), "e2e_frames_per_s": round(batch / e2e_p50, 2),
           "e2e_over_model": round(model_p50 / e2e_p50, 4), "host_share": round(max(0.0, 1 - model_p50 / e2e_p50), 4),
           "stages_p50_s": {k: round(_p50([s[k] for s in stages]), 6) for k in ("decode", "model", "write")},
           "iters": [len(model_s), len(e2e_s)], "backend_notes": list(getattr(be, "notes", []) or []),
           "e2e_samples_s": [round(x, 6) for x in e2e_s], "model_samples_s": [round(x, 6) for x in model_s]}
    rec["targets"] = {"e2e_over_model>=0.5": rec["e2e_over_model"] >= TARGET_E2E_OVER_MODEL,
                      "host_share<=0.10": rec["host_share"] <= TARGET_HOST_SHARE}
    return rec


def main(argv: Optional[List[str]] = None) -> int:
    from clipfuse.runtime.cliargs import float_range, int_range
    from clipfuse.runtime.cliargs import ScriptParser as Parser   # usage errors are one line
    parser = Parser(prog="python -m clipfuse.benchmarks.frame_e2e", description=__doc__.splitlines()[0])
    parser.add_argument("graph", help="frame graph (.onnx from clipfuse export --frame) or its engine")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--image", required=True, help="a JPEG of the frame graph's size")
    parser.add_argument("--batch", type=int_range(1, 1024), default=8)
    parser.add_argument("--warmup", type=int_range(0, 1000), default=3)
    parser.add_argument("--iters", type=int_range(1, 100000), default=20)
    parser.add_argument("--max-seconds", type=float_range(0.0, 3600.0, low_open=True), default=30.0)
    parser.add_argument("--cuda-graph", action="store_true", help="backend option cuda_graph=True")
    parser.add_argument("-o", "--output", required=True, help="JSON file")
    args = parser.parse_args(argv)
    from clipfuse.runtime.errors import ClipfuseError
    opts = {"cuda_graph": True} if args.cuda_graph else {}
    try:
        rec = measure(Path(args.graph), args.backend, Path(args.image), args.batch, args.warmup, args.iters,
                      args.max_seconds, opts)
    except ClipfuseError as exc:
        print(f"frame_e2e: error: {exc}", file=sys.stderr)
        return 2
    Path(args.output).write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# bench name -> (runtime backend, graph precision, backend options); what `bench --scope e2e` runs
# frame graphs on. The torch runners have no frame-graph form (frame graphs are the deployment path).
FRAME_BACKENDS = {
    "ort-cuda-fp32": ("ort-cuda", "fp32", {}),
    "ort-cuda-fp16": ("ort-cuda", "fp16", {}),
    "ort-cuda-fp16-graph": ("ort-cuda", "fp16", {"cuda_graph": True}),
    "ort-trt-fp16": ("ort-trt", "fp32", {"fp16": True}),
    "tensorrt-fp16": ("tensorrt", "engine", {}),
    "tensorrt-fp16-graph": ("tensorrt", "engine", {"cuda_graph": True}),
    "ort-cpu-fp32": ("ort-cpu", "fp32", {}),
    "ort-cpu-fp16": ("ort-cpu", "fp16", {}),
}
CPU_FRAME_BACKENDS = ("ort-cpu-fp32", "ort-cpu-fp16")


def _frame_graph_for(kind: str, frame_onnx: Path, manifest: dict, max_batch: int) -> Path:
    """The FP32 frame graph, its FP16 graph, or an engine of it for a flavour that runs on this GPU."""
    from clipfuse.export.build import BuildOptions, build
    from clipfuse.export.trt_build import BatchProfile
    from clipfuse.runtime import trt_support
    if kind == "fp32":
        return frame_onnx
    fp16 = frame_onnx.with_name(frame_onnx.stem + ".fp16.onnx")
    if kind == "fp16":
        if not fp16.is_file():  # the dry run writes the FP16 graph and its manifest, no TensorRT needed
            build(frame_onnx, manifest, BuildOptions(dry_run=True), log=lambda msg: None)
        return fp16
    found = sorted(frame_onnx.parent.glob(f"{frame_onnx.stem}.*-fp16-b1_{max_batch}_{max_batch}-*.engine"))
    if found:
        return found[-1]
    sm = trt_support.device_sm()
    if sm is None:
        raise _Skip("no CUDA GPU visible")
    flavour = trt_support.choose_for_device(None, sm)
    return build(frame_onnx, manifest, BuildOptions(precision="fp16", trt=flavour,
                                                    batch=BatchProfile(1, max_batch, max_batch),
                                                    targets=(sm,) if flavour == "rtx" else ()),
                 log=lambda msg: None).engine


class _Skip(Exception):
    pass


def bench_frame_graphs(cfg, head: str, size: int, clip, workdir: Path, image_path: Path, flops_per_image: int,
                       emit, say) -> None:
    """`bench --scope e2e`: a frame graph of the e2e image's size on every selected backend that runs
    one; records (backend NAME+frame) carry the model-only throughput, host share and targets."""
    from dataclasses import replace

    from clipfuse.export.api import ImageExportSpec, export_image_graph
    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.imageio import read_image
    from clipfuse.runtime.manifest import manifest_path_for, read_manifest

    from .timing import latency_stats

    if cfg.frame_graphs == "off":
        return
    names = [n for n in cfg.backends if n in FRAME_BACKENDS
             and (cfg.frame_graphs == "all" or n not in CPU_FRAME_BACKENDS)]
    if not names:
        return
    h, w = read_image(image_path).shape[:2]
    spec = ImageExportSpec(method=head, model=cfg.model, pretrained=cfg.pretrained, classes=cfg.classes, size=size,
                           templates=cfg.templates, heads_checkpoint=cfg.heads_ckpt, seed=cfg.seed)
    say(f"[{head} {size}] exporting the {w}x{h} frame graph")
    frame_onnx = export_image_graph(replace(spec, frame=(h, w)), workdir / f"{head}-{size}-frame", clip=clip)
    manifest = read_manifest(manifest_path_for(frame_onnx))
    for name in names:
        backend, kind, options = FRAME_BACKENDS[name]
        for batch in cfg.batches:
            base = {"head": head, "size": size, "backend": f"{name}+frame", "scope": "e2e", "batch": batch,
                    "flops_per_image": flops_per_image, "label": f"{name} frame graph", "device":
                    "cpu" if backend == "ort-cpu" else "cuda", "precision": "fp16" if kind != "fp32" else "fp32"}
            opts = dict(options)
            if backend == "ort-trt":
                opts["batch_profile"] = [1, max(cfg.batches), max(cfg.batches)]
            if backend == "ort-cpu":
                opts["threads"] = cfg.threads
            try:
                graph = _frame_graph_for(kind, frame_onnx, manifest, max(cfg.batches))
                rec = measure(graph, backend, image_path, batch, cfg.warmup, cfg.iters, cfg.max_seconds or 60.0, opts)
            except (_Skip, ClipfuseError) as exc:
                say(f"[{head} {size}] {name} frame graph: skipped ({exc})")
                emit(dict(base, status="skipped", reason=str(exc)))
                continue
            except Exception as exc:
                say(f"[{head} {size}] {name} frame graph: failed ({type(exc).__name__}: {exc})")
                emit(dict(base, status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}"))
                continue
            # per frame, like the window path's per-image e2e latency it is compared with
            lat = latency_stats([x / batch for x in rec.pop("e2e_samples_s")], 1).to_dict()
            say(f"[{head} {size}] {name} frame graph b{batch}: {rec['e2e_frames_per_s']:.1f} frames/s e2e, "
                f"{rec['model_frames_per_s']:.1f} model only, host share {100 * rec['host_share']:.0f} %")
            emit(dict(base, status="ok", latency=lat, frame_graph=rec))
