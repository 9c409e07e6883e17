"""GPU acceptance check: everything clipfuse claims about a GPU, measured on this machine.

    python -m clipfuse.benchmarks.gpu_check -o DIR [--model ViT-B-16] [--tests tests/] [--budget 480]

Steps, each a separate process with its own timeout, all within --budget seconds (8 minutes by
default); a step that cannot run here is recorded as "skipped: <why>", never silently dropped:
1. `clipfuse doctor --json` (versions, GPU, which TensorRT flavour serves this GPU);
2. the GPU-marked tests (`pytest -m "gpu or tensorrt"` on --tests; a wheel install has none:
   pass the checkout's tests/ folder);
3. which GPU backends exist here: TensorRT engines of every installed flavour whose engines run
   on this GPU (clipfuse.runtime.trt_support), ONNX Runtime CUDA (+ the TensorRT EP when the
   TensorRT libraries load), PyTorch CUDA; each absent one with its reason;
4. export: one window graph (NAClIP, --size) and one frame graph of the test photo's size;
5. per backend: `clipfuse build` (engines) -> `clipfuse compare` against the ONNX FP32 graph on
   ONNX Runtime CPU, on the test photos;
6. model benchmark (`clipfuse bench`, batches 1/8/32) of the PyTorch reference, torch.compile
   FP16 and every deployment backend;
7. e2e frame-graph benchmark per backend (clipfuse.benchmarks.frame_e2e: the host only decodes).
Writes DIR/gpu-check.json and DIR/gpu-check.md (machine, versions, every step, the targets).

On a bare GPU machine without network (docs/gpu-check.md has the details): on a machine with
network, download the wheels the GPU machine lacks for its Python (`pip download --only-binary
:all: --python-version 3.12 -d wheels/ onnxruntime-gpu open_clip_torch ...`) and build clipfuse's
own wheel (`pip wheel --no-deps -w wheels/ .`); split big wheels (onnxruntime-gpu is ~250 MB)
into pieces if the transfer is size-limited and join them with `cat` on the GPU machine; there
`pip install --no-index --find-links wheels/ --target /tmp/site clipfuse onnxruntime-gpu ...`,
`export PYTHONPATH=/tmp/site`, then run this module. Never install onnxruntime-gpu next to
onnxruntime: remove the CPU build first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

STEP_TIMEOUTS = {"doctor": 60, "tests": 120, "export": 150, "build": 120, "compare": 90, "bench": 180, "e2e": 90}
PHOTO = Path(__file__).resolve().parents[1] / "tests" / "data" / "street.jpg"
HEAD, SIZE, BATCHES, E2E_BATCH = "naclip", 224, "1,8,32", 8
# bench names per deployment backend (the PyTorch reference and torch.compile FP16 are the baselines)
BENCH_NAMES = {"torch": ["torch-ref", "torch-fused-fp16", "torch-compile-fp16"],
               "ort-cuda": ["ort-cuda-fp16", "ort-cuda-fp16-graph"], "ort-trt": ["ort-trt-fp16"],
               "tensorrt": ["tensorrt-fp16", "tensorrt-fp16-graph"]}


class Check:
    """The record of one run: steps appended as they finish, written after each."""

    def __init__(self, out: Path, budget: float) -> None:
        self.out, self.budget, self.start = out, budget, time.monotonic()
        self.doc: Dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget,
                          "machine": machine(), "versions": {}, "gpu": None, "backends": {}, "steps": []}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def add(self, name: str, status: str, **fields) -> Dict:
        step = {"step": name, "status": status, **fields}
        self.doc["steps"].append(step)
        print(f"gpu_check: {name}: {status}" + (f": {fields['reason']}" if fields.get("reason") else ""),
              file=sys.stderr, flush=True)
        self.write()
        return step

    def skip(self, name: str, why: str) -> Dict:
        return self.add(name, "skipped", reason=why)

    def run(self, name: str, argv: List[str], kind: str, env: Optional[dict] = None) -> Dict:
        """`argv` as a process with the step's timeout (and never past the budget)."""
        timeout = min(STEP_TIMEOUTS[kind], self.left())
        if timeout < 5:
            return self.skip(name, f"the {self.budget:.0f} s budget is spent")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, **(env or {})))
        except subprocess.TimeoutExpired as exc:
            tail = ((exc.stdout or b"") if isinstance(exc.stdout, bytes) else (exc.stdout or "").encode())[-1500:]
            return self.add(name, "timeout", seconds=round(time.monotonic() - t0, 1), command=_line(argv),
                            reason=f"no result within {timeout:.0f} s", output_tail=tail.decode(errors="replace"))
        status = "ok" if proc.returncode == 0 else "failed"
        return self.add(name, status, seconds=round(time.monotonic() - t0, 1), command=_line(argv),
                        returncode=proc.returncode, output_tail=(proc.stdout + proc.stderr)[-1500:],
                        stdout=proc.stdout if kind == "doctor" else None)

    def write(self) -> None:
        from clipfuse.runtime.fileio import write_text_atomic
        self.doc["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "gpu-check.json", json.dumps(self.doc, indent=1))
        write_text_atomic(self.out / "gpu-check.md", render(self.doc))


def _line(argv: List[str]) -> str:
    import shlex
    return " ".join(shlex.quote(a) for a in argv)


def machine() -> Dict:
    from .report import cpu_model
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
            "logical_cpus": os.cpu_count()}


# `clipfuse ARGS` in a child process of this interpreter (the console script may belong to another
# Python on a bare machine with PYTHONPATH installs); a subprocess, not an import of the CLI
_CLIPFUSE = "import sys; from clipfuse.runtime import cli; sys.exit(cli.main(sys.argv[1:]))"


def _cli(*args: str) -> List[str]:
    return [sys.executable, "-c", _CLIPFUSE, *args]


def gpu_backends() -> Dict[str, Dict]:
    """Every GPU backend: {"available": bool, "reason": why not, ...} (what the later steps run)."""
    from clipfuse.runtime import trt_support
    from clipfuse.runtime.backends import ort_cuda
    sm = trt_support.device_sm()
    out: Dict[str, Dict] = {}
    for key in trt_support.AUTO_ORDER:
        name = f"tensorrt:{key}"
        fl = trt_support.flavour(key)
        if sm is None:
            out[name] = {"available": False, "reason": "no CUDA GPU visible (cuda-python / nvidia-smi)"}
        elif not trt_support.runs_on(key, sm):
            out[name] = {"available": False, "reason": trt_support.cannot_run_reason(key, sm)}
        elif trt_support.probe(key) is None:
            out[name] = {"available": False, "reason": f"{fl.label} is not installed ({fl.wheel})"}
        else:
            out[name] = {"available": True, "flavour": key, "version": trt_support.probe(key)}
    for name in ("ort-cuda", "ort-trt"):
        reason = ort_cuda.unavailable_reason(name)
        out[name] = {"available": reason is None, "reason": reason}
    try:
        import torch
        cuda = torch.cuda.is_available()
        out["torch"] = {"available": cuda, "reason": None if cuda else f"torch {torch.__version__} sees no CUDA GPU"}
    except Exception as exc:
        out["torch"] = {"available": False, "reason": f"torch does not import ({type(exc).__name__})"}
    for rec in out.values():
        if rec["available"]:
            rec.pop("reason", None)
    return out


def check(out: Path, model: str = "ViT-B-16", tests: Optional[Path] = None, budget: float = 480.0,
          photo: Path = PHOTO) -> Dict:
    c = Check(out, budget)
    work = out / "work"
    # 1. doctor
    step = c.run("doctor", _cli("doctor", "--json"), "doctor")
    if step["status"] == "ok":
        try:
            report = json.loads(step.pop("stdout"))
            c.doc["versions"], c.doc["gpu"] = report.get("versions", {}), report.get("gpu")
            c.doc["engines_for_this_gpu"] = report.get("engines_for_this_gpu")
        except (ValueError, TypeError):
            step["reason"] = "doctor --json printed no JSON"
    step.pop("stdout", None)
    # 3 (first: the tests and everything after depend on it). which GPU backends
    backends = c.doc["backends"] = gpu_backends()
    c.write()
    have = [name for name, rec in backends.items() if rec["available"]]
    # 2. the GPU-marked tests
    if c.doc["gpu"] is None:
        c.skip("gpu tests", "no CUDA GPU visible (cuda-python / nvidia-smi)")
    elif tests is None or not Path(tests).is_dir():
        c.skip("gpu tests", "no tests folder (a wheel install has none): pass --tests CHECKOUT/tests")
    else:
        c.run("gpu tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu or tensorrt", str(tests)], "tests")
    if not have:
        why = "no GPU backend available here (each one's reason is in the backends table)"
        c.skip("export", why)
        for name, rec in backends.items():
            c.skip(f"compare {name}", rec["reason"])
        c.skip("bench model", why)
        for name, rec in backends.items():
            if name != "torch":
                c.skip(f"bench e2e frame graph {name}", rec["reason"])
        c.write()
        return c.doc
    # 4. export a window graph and a frame graph of the photo's size
    from PIL import Image
    w, h = Image.open(photo).size
    graph, frame = work / HEAD, work / f"{HEAD}-frame"
    c.run("export window graph", _cli("export", "--head", HEAD, "--model", model, "--pretrained", "none",
                                      "--size", str(SIZE), "--templates", "single", "-q", "-o", str(graph)), "export")
    c.run("export frame graph", _cli("export", "--head", HEAD, "--model", model, "--pretrained", "none",
                                     "--templates", "single", "--frame", f"{w}x{h}", "-q", "-o", str(frame)), "export")
    onnx, frame_onnx = graph.with_suffix(".onnx"), frame.with_suffix(".onnx")
    # 5. build + compare per backend
    bench_names = []
    for name, rec in backends.items():
        if not rec["available"]:
            c.skip(f"compare {name}", rec["reason"])
            if name != "torch":
                c.skip(f"bench e2e frame graph {name}", rec["reason"])
            continue
        if not onnx.is_file():
            c.skip(f"compare {name}", "the export step did not produce the graph")
            continue
        if name.startswith("tensorrt:"):
            flavour = rec["flavour"]
            b = c.run(f"build {name}", _cli("build", str(onnx), "--trt", flavour, "--precision", "fp16",
                                            "--batch", "1:8:32", "--workspace-gb", "4"), "build")
            engines = sorted(onnx.parent.glob(f"{HEAD}.{ 'rtx' if flavour == 'rtx' else 'trt'}*-fp16-b1_8_32-*.engine"))
            if b["status"] != "ok" or not engines:
                c.skip(f"compare {name}", "no engine was built")
            else:
                c.run(f"compare {name}", _cli("compare", str(onnx), str(engines[-1]), "--images", str(photo),
                                              "--atol", "2e-2"), "compare")
            c.run(f"build frame engine {name}", _cli("build", str(frame_onnx), "--trt", flavour, "--precision", "fp16",
                                                     "--batch", f"1:{E2E_BATCH}:{E2E_BATCH}"), "build")
        elif name == "torch":
            c.run("compare torch", _cli("compare", str(onnx), f"{onnx}@torch", "--images", str(photo)), "compare")
        else:
            c.run(f"compare {name}", _cli("compare", str(onnx), f"{onnx}@{name}", "--images", str(photo)), "compare")
            if name == "ort-cuda":   # the FP16 graph (what the benchmark's -fp16 backends run)
                fp16 = onnx.with_name(f"{HEAD}.fp16.onnx")
                if not fp16.is_file():
                    c.run("write FP16 graph", _cli("build", str(onnx), "--dry-run"), "build")
                c.run("compare ort-cuda fp16", _cli("compare", str(onnx), f"{fp16}@ort-cuda", "--images", str(photo),
                                                    "--atol", "2e-2"), "compare")
        bench_names += BENCH_NAMES["tensorrt" if name.startswith("tensorrt:") else name]
    # 6. model benchmark, b1/8/32, every backend in one interleaved run
    names = ["torch-ref"] + [n for n in dict.fromkeys(bench_names) if n != "torch-ref"]
    torch_dev = "cuda" if backends["torch"]["available"] else "cpu"
    c.run("bench model", _cli("bench", "--head", HEAD, "--model", model, "--size", str(SIZE), "--batch", BATCHES,
                              "--backends", ",".join(names), "--torch-device", torch_dev, "--warmup", "3",
                              "--iters", "30", "--max-seconds", "4", "--no-plots", "-o", str(out / "bench-model")),
          "bench")
    c.doc["targets"] = targets(out / "bench-model.json")
    # 7. e2e on the frame graph, per deployment backend
    for name, rec in backends.items():
        if not rec["available"] or name == "torch":
            continue
        if name.startswith("tensorrt:"):
            found = sorted(frame_onnx.parent.glob(f"{frame.name}.*-fp16-b1_{E2E_BATCH}_{E2E_BATCH}-*.engine"))
            if not found:
                c.skip(f"bench e2e frame graph {name}", "no frame-graph engine was built")
                continue
            graph_arg, backend_arg = str(found[-1]), "tensorrt"
        else:
            graph_arg, backend_arg = str(frame_onnx), name
        dst = out / f"e2e-{name.replace(':', '-')}.json"
        step = c.run(f"bench e2e frame graph {name}",
                     [sys.executable, "-m", "clipfuse.benchmarks.frame_e2e", graph_arg, "--backend", backend_arg,
                      "--image", str(photo), "--batch", str(E2E_BATCH), "--cuda-graph", "-o", str(dst)], "e2e")
        if step["status"] == "ok" and dst.is_file():
            step["result"] = json.loads(dst.read_text())
    c.write()
    return c.doc


def targets(bench_json: Path) -> Optional[Dict]:
    """The deployment-path targets from a model benchmark: best deployment backend vs the PyTorch
    reference at b1 (>= 3x) and vs torch.compile FP16 at b32 (above it)."""
    if not bench_json.is_file():
        return None
    doc = json.loads(bench_json.read_text())
    p50 = {(r["backend"], r["batch"]): r["latency"]["p50_s"] for r in doc.get("results", []) if r.get("status") == "ok"}
    deploy = [n for n in {b for b, _ in p50} if n.startswith(("ort-cuda", "ort-trt", "tensorrt"))]
    out: Dict = {}
    if ("torch-ref", 1) in p50 and any((n, 1) in p50 for n in deploy):
        best = min((p50[(n, 1)], n) for n in deploy if (n, 1) in p50)
        out["b1_speedup_vs_reference"] = {"backend": best[1], "value": round(p50[("torch-ref", 1)] / best[0], 2),
                                          "target": ">= 3", "met": p50[("torch-ref", 1)] / best[0] >= 3}
    if ("torch-compile-fp16", 32) in p50 and any((n, 32) in p50 for n in deploy):
        best = min((p50[(n, 32)], n) for n in deploy if (n, 32) in p50)
        ratio = p50[("torch-compile-fp16", 32)] / best[0]
        out["b32_vs_torch_compile_fp16"] = {"backend": best[1], "value": round(ratio, 2), "target": "> 1",
                                            "met": ratio > 1}
    return out


def render(doc: Dict) -> str:
    gpu = doc.get("gpu") or {}
    v = doc.get("versions") or {}
    lines = ["# clipfuse GPU check", "",
             f"- Created {doc['created']}, {doc.get('elapsed_s', '?')} s of a {doc['budget_s']:.0f} s budget",
             f"- Machine: {doc['machine']['cpu']}, {doc['machine']['logical_cpus']} logical CPUs, "
             f"{doc['machine']['platform']}, python {doc['machine']['python']}",
             f"- GPU: {gpu.get('name', 'none visible')}" + (f" (SM {gpu['sm']}, {gpu.get('driver')})" if gpu else ""),
             "- Versions: " + (", ".join(f"{k} {val}" for k, val in v.items() if val) or "unknown"), "",
             "## GPU backends", "", "| backend | available | why not |", "|---|---|---|"]
    for name, rec in doc.get("backends", {}).items():
        lines.append(f"| {name} | {'yes' if rec['available'] else 'no'} | {rec.get('reason') or ''} |")
    lines += ["", "## Steps", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for s in doc["steps"]:
        if s["status"] == "skipped":
            status, detail = f"skipped: {s.get('reason', '')}", ""
        else:
            status = s["status"]
            detail = s.get("reason") or ("" if s["status"] == "ok" else (s.get("output_tail") or "")[-200:])
        lines.append(f"| {s['step']} | {_cell(status)} | {s.get('seconds', '')} | {_cell(detail)} |")
    e2e = [s["result"] for s in doc["steps"] if s.get("result")]
    if e2e:
        lines += ["", "## End to end on frame graphs (host decodes only)", "",
                  "| backend | batch | model-only frames/s | e2e frames/s | e2e / model (>= 50 %) | host share (<= 10 %) |",
                  "|---|---|---|---|---|---|"]
        for r in e2e:
            lines.append(f"| {r['backend']} | {r['batch']} | {r['model_frames_per_s']} | {r['e2e_frames_per_s']} | "
                         f"{100 * r['e2e_over_model']:.0f} % | {100 * r['host_share']:.0f} % |")
    if doc.get("targets"):
        lines += ["", "## Deployment-path targets (model benchmark)", ""]
        for key, t in doc["targets"].items():
            lines.append(f"- {key}: {t['value']}x ({t['backend']}), target {t['target']}: "
                         f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def build_parser() -> argparse.ArgumentParser:
    from clipfuse.runtime.cliargs import float_range
    from clipfuse.runtime.cliargs import ScriptParser as Parser   # usage errors are one line
    parser = Parser(prog="python -m clipfuse.benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, help="folder for gpu-check.json/.md and the work files")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model, random weights (default: %(default)s)")
    default_tests = Path(__file__).resolve().parents[1] / "tests"
    parser.add_argument("--tests", default=str(default_tests) if default_tests.is_dir() else None,
                        help="the checkout's tests/ folder for the GPU-marked tests (default: beside this package)")
    parser.add_argument("--budget", type=float_range(30.0, 3600.0), default=480.0,
                        help="seconds for everything, 30-3600 (default: %(default)s)")
    parser.add_argument("--photo", default=str(PHOTO), help="test photo (default: tests/data/street.jpg)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    photo = Path(args.photo)
    if not photo.is_file():
        print(f"gpu_check: error: test photo not found: {photo} (pass --photo)", file=sys.stderr)
        return 2
    doc = check(Path(args.output), args.model, Path(args.tests) if args.tests else None, args.budget, photo)
    bad = [s["step"] for s in doc["steps"] if s["status"] in ("failed", "timeout")]
    print(f"gpu_check: wrote {Path(args.output) / 'gpu-check.json'} and .md; "
          f"{len(bad)} step(s) failed" + (f": {', '.join(bad)}" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
