"""Peak memory and wall time of `clipfuse export`, one child process per model.

    python -m clipfuse.benchmarks.export_memory --model ViT-B-16 --model ViT-L-14 \
        --exporter legacy --exporter dynamo --out benchmarks/results/export-memory-cpu

Each export runs in a fresh child process (`clipfuse export ...`), so the
peak resident set size (the child's ru_maxrss, from wait4) is the export's alone, imports
included. (Linux carries ru_maxrss across fork + exec: the figure is max(this parent's RSS at the
fork, the export's peak), so this parent stays small: it imports neither torch nor onnx.) The FP32 graph size (graph + external-data file) is read from what the export wrote,
and the ratio peak / graph is the figure the lean-export target is stated in (<= 3x). The text
embedding time is parsed from the export's log. An address-space limit (--limit-gb, RLIMIT_AS)
keeps a runaway export from taking a shared machine down.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

DEFAULT_CLASSES = "sky,tree,road,car"


def _clipfuse_script() -> str:
    """The `clipfuse` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("clipfuse")
    return str(script) if script.is_file() else "clipfuse"


def _limit(limit_gb: Optional[float]):
    if not limit_gb:
        return None

    def apply() -> None:
        cap = int(limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return apply


def measure_export(model: str, head: str, size: Optional[int], classes: str, templates: str,
                   limit_gb: Optional[float] = None, keep: Optional[Path] = None,
                   exporter: str = "legacy") -> Dict[str, object]:
    """Run one export in a child process; returns wall seconds, peak RSS and the graph's size."""
    with tempfile.TemporaryDirectory(prefix="clipfuse-export-mem-", dir=keep) as tmp:
        out = Path(tmp) / f"{head}-{model}"
        cmd = [_clipfuse_script(), "export", "--head", head, "--model", model,
               "--pretrained", "none", "--classes", classes, "--templates", templates, "--exporter", exporter,
               "-o", str(out)]
        if size:
            cmd += ["--size", str(size)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_limit(limit_gb), text=True)
        log, _ = proc.communicate()
        wall = time.perf_counter() - start
        # the maximum over this process's children: main() calls this in a fresh process per model
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024          # KiB on Linux
        onnx = out.with_suffix(".onnx") if out.suffix != ".onnx" else out
        ok = proc.returncode == 0 and onnx.is_file()
        graph = onnx.stat().st_size if ok else 0
        data = onnx.with_name(onnx.name + ".data")
        data_bytes = data.stat().st_size if ok and data.is_file() else 0
        text = re.search(r"text embeddings: ([0-9.]+) s", log)
        return {
            "model": model, "head": head, "exporter": exporter, "size": size, "classes": classes.count(",") + 1,
            "templates": templates, "ok": ok, "returncode": proc.returncode,
            "wall_seconds": round(wall, 1), "peak_rss_bytes": peak,
            "peak_rss_gib": round(peak / 2 ** 30, 2), "graph_bytes": graph + data_bytes,
            "external_data": bool(data_bytes),
            "peak_over_graph": round(peak / (graph + data_bytes), 2) if ok else None,
            "text_embedding_seconds": float(text.group(1)) if text else None,
            "log_tail": log.strip().splitlines()[-3:],
        }


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="open_clip model name (repeatable)")
    ap.add_argument("--head", default="naclip")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--classes", default=DEFAULT_CLASSES)
    ap.add_argument("--templates", default="imagenet80")
    ap.add_argument("--limit-gb", type=float, default=None, help="address-space cap of each child (RLIMIT_AS)")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--exporter", action="append", choices=("legacy", "dynamo"),
                    help="clipfuse export --exporter (repeatable; default: legacy)")
    ap.add_argument("--label", default="", help="what code was measured (e.g. a commit)")
    args = ap.parse_args(argv)
    rows = []
    for model in args.model:
        for exporter in args.exporter or ["legacy"]:
            # a fresh process per export: RUSAGE_CHILDREN is a maximum over all children so far
            cmd = [sys.executable, "-c",
                   "import json,sys; from clipfuse.benchmarks.export_memory import measure_export as m; "
                   "print(json.dumps(m(*json.loads(sys.argv[1]))))",
                   json.dumps([model, args.head, args.size, args.classes, args.templates, args.limit_gb, None,
                               exporter])]
            res = subprocess.run(cmd, capture_output=True, text=True)
            row = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {
                "model": model, "exporter": exporter, "ok": False, "error": res.stderr.strip().splitlines()[-1:]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        import torch
        meta = {"what": "peak RSS and wall time of `clipfuse export` (child process ru_maxrss), random weights "
                        "(--pretrained none)", "label": args.label,
                "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM (shared)",
                "python": platform.python_version(), "torch": torch.__version__, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
        lines = [f"# clipfuse export memory ({meta['label']})", "", f"{meta['what']}; {meta['machine']}; "
                 f"torch {meta['torch']}; {meta['date']}", "",
                 "| model | head | exporter | classes x templates | wall s | text emb s | peak RSS GiB | FP32 graph GiB | peak / graph |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if not r.get("ok"):
                lines.append(f"| {r['model']} | {r.get('exporter')} | failed: {r.get('log_tail') or r.get('error')} |")
                continue
            lines.append(f"| {r['model']} | {r['head']} | {r.get('exporter', 'legacy')} | {r['classes']} x "
                         f"{r['templates']} | {r['wall_seconds']} | "
                         f"{r['text_embedding_seconds']} | {r['peak_rss_gib']} | "
                         f"{r['graph_bytes'] / 2 ** 30:.2f}{' (ext. data)' if r['external_data'] else ''} | "
                         f"{r['peak_over_graph']} |")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
