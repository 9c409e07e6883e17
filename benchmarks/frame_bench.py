"""Host protocol cost and frame graph vs window graph + host protocol, on ONNX Runtime.

    python -m clipfuse.benchmarks.frame_bench -o benchmarks/results/cpu-vitb16-frame [--model ViT-B-16]

Per case (VOC 500x375 / 21 classes with SCLIP's VOC rules, ADE 683x512 / 150 classes, Cityscapes
2048x1024 / 19 classes at short side 560): export the SCLIP window graph and a frame graph for the
case's size (same weights), then time, best of --repeats:
* window graph + host protocol (`Segmenter.segment`, per stage: resize, windows, model, protocol,
  postprocess), and the previous host path (float resize, per-window upsampling, averaging, 2-tap
  resize, softmax) on the same window scores, with the number of labels that differ;
* the frame graph (one call: frame in, labels out).
Writes NAME.json, NAME.md and NAME.png.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import numpy as np

CASES = [
    {"name": "voc", "classes": 21, "size": (375, 500),
     "protocol": {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1}},
    {"name": "ade", "classes": 150, "size": (512, 683), "protocol": {}},
    {"name": "cityscapes", "classes": 19, "size": (1024, 2048), "protocol": {"short_side": 560}},
]


def _photo(size) -> np.ndarray:
    """The repository's test photo (tests/data/street.jpg) resized, or a synthetic one."""
    from PIL import Image
    path = Path(__file__).resolve().parents[1] / "tests" / "data" / "street.jpg"
    if path.exists():
        return np.asarray(Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BILINEAR))
    from .suite import synthetic_jpeg
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        return np.asarray(Image.open(synthetic_jpeg(Path(tmp) / "x.jpg", size)).convert("RGB"))


def _old_host_path(image, scores, seg) -> float:
    """Seconds of the previous host path on the same window scores (float resize + reference path)."""
    from clipfuse.runtime import protocol as P
    p = seg.protocol
    t0 = time.perf_counter()
    size = P.processing_size(*image.shape[:2], p.short_side, p.long_side_max)
    resized = P.resize_image_float(image, size)
    boxes = P.window_boxes(*size, p.window, p.stride)
    P.extract_windows(resized, boxes, p.window)
    avg = P.average_window_scores(scores, boxes, size, p.window)
    P.labels_from_scores(avg, image.shape[:2], p)
    return time.perf_counter() - t0


def run_case(case: dict, model: str, workdir: Path, clip, repeats: int, threads: int) -> dict:
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    from clipfuse.runtime import protocol as P
    from clipfuse.runtime.segmenter import Segmenter

    classes = [["background"]] + [[f"class {i}"] for i in range(1, case["classes"])]
    spec = ImageExportSpec("sclip", model=model, pretrained="none", classes=classes, templates="single", seed=0)
    win = export_image_graph(spec, workdir / f"{case['name']}-win", clip=clip)
    frm = export_image_graph(replace(spec, frame=tuple(case["size"]), frame_protocol=dict(case["protocol"] or {})),
                             workdir / f"{case['name']}-frame", clip=clip)
    image = _photo(case["size"])
    opts = {"threads": threads}
    best: Dict[str, float] = {}
    rec: dict = {"case": case["name"], "classes": case["classes"], "frame": list(case["size"]),
                 "protocol": case["protocol"]}
    with Segmenter.open(win, backend_options=opts, batch=4, **case["protocol"]) as seg:
        captured = {}
        infer = seg.infer_windows

        def keep(crops):
            out = infer(crops)
            captured.setdefault("scores", []).append(out)
            return out
        seg.infer_windows = keep
        for _ in range(repeats):
            captured.clear()
            stages: Dict[str, float] = {}
            t0 = time.perf_counter()
            result = seg.segment(image, timings=stages)
            stages["total"] = time.perf_counter() - t0
            for k, v in stages.items():
                best[k] = min(best.get(k, np.inf), v)
        scores = np.concatenate(captured["scores"])
        old = min(_old_host_path(image, scores, seg) for _ in range(max(1, repeats - 1)))
        size = result.processing_size
        ref = P.labels_from_scores(P.average_window_scores(scores, P.window_boxes(*size, seg.window, seg.protocol.stride),
                                                           size, seg.window), image.shape[:2], seg.protocol)
        rec["labels_differing_from_previous_path"] = int((ref != result.labels).sum())
        rec["windows"] = result.num_windows
        window_labels = result.labels
    host = sum(best.get(k, 0.0) for k in ("resize", "windows", "protocol", "postprocess"))
    rec.update(stages_best_s={k: round(v, 5) for k, v in best.items()}, host_s=round(host, 5),
               host_over_model=round(host / best["model"], 4), previous_host_s=round(old, 5),
               previous_host_over_model=round(old / best["model"], 4))
    with Segmenter.open(frm, backend_options=opts) as seg:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = seg.segment(image)
            times.append(time.perf_counter() - t0)
    rec.update(frame_graph_s=round(min(times), 5), window_graph_plus_host_s=round(best["total"], 5),
               frame_vs_window_label_agreement=float((out.labels == window_labels).mean()))
    return rec


def render(doc: dict) -> str:
    lines = [f"# Host protocol cost and frame graph vs window graph (SCLIP {doc['model']}, random weights)", "",
             f"- Machine: {doc['machine']}; {doc['threads']} threads; versions: {doc['versions']}",
             f"- Best of {doc['repeats']} calls per point; shared machine (load {doc['loadavg']}): ratios are "
             "more stable than absolute times.", "",
             "| case | frame | classes | windows | model (ORT CPU) | host now | host / model | host before | "
             "before / model | labels changed | frame graph | window graph + host | frames/s frame vs window | "
             "frame vs window labels |",
             "|" + "---|" * 14]
    for r in doc["results"]:
        lines.append(
            f"| {r['case']} | {r['frame'][1]}x{r['frame'][0]} | {r['classes']} | {r['windows']} | "
            f"{r['stages_best_s']['model'] * 1e3:.0f} ms | {r['host_s'] * 1e3:.1f} ms | "
            f"{100 * r['host_over_model']:.1f} % | {r['previous_host_s'] * 1e3:.0f} ms | "
            f"{100 * r['previous_host_over_model']:.1f} % | {r['labels_differing_from_previous_path']} | "
            f"{r['frame_graph_s'] * 1e3:.0f} ms | {r['window_graph_plus_host_s'] * 1e3:.0f} ms | "
            f"{1 / r['frame_graph_s']:.2f} vs {1 / r['window_graph_plus_host_s']:.2f} | "
            f"{100 * r['frame_vs_window_label_agreement']:.3f} % |")
    lines += ["", "Host stages now (best, ms): " + "; ".join(
        f"{r['case']}: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["stages_best_s"].items()
                                     if k not in ("model", "total")) for r in doc["results"]), ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = doc["results"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(res))
    a.bar(x - 0.2, [1 / r["frame_graph_s"] for r in res], 0.4, label="frame graph (one call)")
    a.bar(x + 0.2, [1 / r["window_graph_plus_host_s"] for r in res], 0.4, label="window graph + host protocol")
    a.set_xticks(x, [f"{r['case']}\n{r['frame'][1]}x{r['frame'][0]}" for r in res])
    a.set_ylabel("frames/s (ONNX Runtime CPU)")
    a.legend(fontsize=8)
    a.set_title("frames/s")
    b.bar(x - 0.2, [100 * r["previous_host_over_model"] for r in res], 0.4, label="before")
    b.bar(x + 0.2, [100 * r["host_over_model"] for r in res], 0.4, label="now")
    b.set_xticks(x, [r["case"] for r in res])
    b.set_ylabel("host protocol / model time (%)")
    b.set_yscale("log")
    b.legend(fontsize=8)
    b.set_title("host protocol cost")
    fig.suptitle(f"SCLIP {doc['model']}, {doc['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: List[str] = None) -> int:
    import os
    import platform
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, help="output path without suffix")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=",".join(c["name"] for c in CASES))
    args = parser.parse_args(argv)
    import onnxruntime
    import torch

    from clipfuse.export.weights import load_clip
    from clipfuse.runtime._version import __version__
    from .report import cpu_model
    torch.set_num_threads(args.threads)
    clip = load_clip(args.model, "none", seed=0)
    wanted = args.cases.split(",")
    doc = {"model": args.model, "threads": args.threads, "repeats": args.repeats,
           "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
           "versions": f"clipfuse {__version__}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}, "
                       f"torch {torch.__version__}, python {platform.python_version()}",
           "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": []}
    with tempfile.TemporaryDirectory(prefix="clipfuse-frame-bench-") as tmp:
        for case in CASES:
            if case["name"] in wanted:
                rec = run_case(case, args.model, Path(tmp), clip, args.repeats, args.threads)
                print(json.dumps(rec), flush=True)
                doc["results"].append(rec)
    doc["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(render(doc))
    plot(doc, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
