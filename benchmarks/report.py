"""Benchmark documents: the JSON (all raw numbers + machine, versions, commit), derived metrics
(speed-up over the PyTorch FP32 reference, fraction of the FLOP floor) and the Markdown tables."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.fileio import write_text_atomic

from .backends import REFERENCE
from .timing import load_average

SCHEMA = "clipfuse-bench/1"
LOAD_CAVEAT = ("Timings were taken on a SHARED machine (other jobs running; see the load averages "
               "recorded before/after every measurement in the JSON): absolute numbers are pessimistic "
               "and noisy, ratios between backends measured back to back are more reliable.")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_info(cwd: Optional[Path] = None) -> Dict[str, object]:
    """Commit of the source tree (read-only git queries; --no-optional-locks: never touch the index)."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                                 timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine_info(threads: int) -> dict:
    from clipfuse.runtime.doctor import collect
    doc = collect()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads_used": threads,
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "gpu": doc.get("gpu"),
        "host_memory": doc.get("host_memory"),
        "onnxruntime_providers": doc.get("onnxruntime_providers"),
        "load_average_at_start": load_average(),
        "versions": doc.get("versions"),
        "openvino": doc.get("openvino"),  # version, devices, the CPU's BF16/AMX/VNNI flags
    }


def new_document(config: dict, machine: dict, device_peak: dict, flops: dict) -> dict:
    return {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config, "runs": [config], "machine": machine, "git": git_info(), "device_peak": device_peak,
            "flops": flops, "results": [], "caveats": [LOAD_CAVEAT]}


def merge_peak(doc: dict, key: str, entry: dict) -> None:
    """Keep the best peak seen: a peak is what the device can do, and a busy moment only lowers it."""
    peaks = doc.setdefault("device_peak", {})
    old = peaks.get(key)
    if not old or entry["flops_per_s"] > old["flops_per_s"]:
        peaks[key] = dict(entry, measurements=(old or {}).get("measurements", 0) + 1)
    else:
        old["measurements"] = old.get("measurements", 1) + 1


def _peak_for(doc: dict, rec: dict) -> Optional[float]:
    peaks = doc.get("device_peak") or {}
    if rec.get("device") == "cpu":
        entry = peaks.get("cpu_fp32")
    else:
        entry = peaks.get("cuda_fp16") if "fp16" in str(rec.get("precision")) else peaks.get("cuda_fp32")
    return entry.get("flops_per_s") if entry else None


def add_derived(doc: dict) -> dict:
    """Speed-up over the reference and fraction of the FLOP floor for every finished record."""
    ok = [r for r in doc["results"] if r.get("status") == "ok"]
    ref = {(r["head"], r["size"], r["batch"], r["scope"]): r for r in ok if r["backend"] == REFERENCE}
    for rec in ok:
        lat = rec["latency"]
        base = ref.get((rec["head"], rec["size"], rec["batch"], rec["scope"]))
        rec["speedup_vs_reference"] = base["latency"]["p50_s"] / lat["p50_s"] if base else None
        peak = _peak_for(doc, rec)
        if rec["scope"] == "model":
            flops_call = rec["flops_per_image"] * rec["batch"]
            rec["achieved_flops_per_s"] = flops_call / lat["p50_s"]
            rec["floor_s"] = flops_call / peak if peak else None
            rec["fraction_of_floor"] = rec["floor_s"] / lat["p50_s"] if peak else None
        else:  # windows per image depend on the image; no per-call FLOP count
            rec["achieved_flops_per_s"] = rec["floor_s"] = rec["fraction_of_floor"] = None
    return doc


def write_json(doc: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=False) + "\n")


def read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClipfuseError(f"cannot read benchmark results {path}: {exc}") from None
    if doc.get("schema") != SCHEMA:
        raise ClipfuseError(f"{path} is not a clipfuse benchmark file (schema {doc.get('schema')!r})")
    return doc


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _diff(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1e}" if isinstance(x, (int, float)) else "error"


def _load(rec: dict) -> str:
    a, b = rec.get("loadavg_before"), rec.get("loadavg_after")
    return f"{a[0]:.1f}/{b[0]:.1f}" if a and b else "-"


def headline_rows(doc: dict, batch: int = 1) -> List[dict]:
    """Per (head, size): p50 and speed-up of every backend at `batch` (the README's table)."""
    rows: Dict[tuple, dict] = {}
    for rec in doc["results"]:
        if rec.get("status") != "ok" or rec["batch"] != batch:
            continue
        row = rows.setdefault((rec["size"], rec["head"]), {"size": rec["size"], "head": rec["head"]})
        row[rec["backend"]] = (rec["latency"]["p50_s"], rec.get("speedup_vs_reference"))
    return [rows[k] for k in sorted(rows)]


def _backends_in(doc: dict) -> List[str]:
    seen: List[str] = []
    for rec in doc["results"]:
        if rec.get("status") == "ok" and rec["backend"] not in seen:
            seen.append(rec["backend"])
    return seen


def _labels(doc: dict) -> Dict[str, str]:
    return {r["backend"]: r.get("label", r["backend"]) for r in doc["results"] if r.get("label")}


def render_markdown(doc: dict) -> str:
    cfg, mach = doc["config"], doc["machine"]
    v = mach.get("versions") or {}
    labels = _labels(doc)
    gpu = mach.get("gpu")
    lines = [f"# clipfuse benchmark: {cfg['model']} ({cfg['pretrained']} weights), scope `{cfg['scope']}`", ""]
    lines.append(f"- Machine: {mach['cpu_model']}, {mach['cpu_count']} logical CPUs ({mach['threads_used']} threads "
                 f"used), GPU: {gpu['name'] if gpu else 'none'}; {mach['platform']}")
    lines.append(f"- Versions: clipfuse {v.get('clipfuse')}, python {v.get('python')}, torch {v.get('torch')}, "
                 f"onnxruntime {v.get('onnxruntime')}, onnx {v.get('onnx')}, numpy {v.get('numpy')}, "
                 f"tensorrt {v.get('tensorrt') or 'absent'}"
                 + (f", openvino {mach['openvino']['version']}" if (mach.get("openvino") or {}).get("version") else ""))
    git = doc.get("git") or {}
    lines.append(f"- Commit {git.get('commit') or '?'}{' (+ uncommitted changes)' if git.get('dirty') else ''}; "
                 f"created {doc['created']}")
    lines.append(f"- {len(cfg['classes'])} classes ({sum(len(c) for c in cfg['classes'])} names), "
                 f"templates `{cfg['templates']}`")
    for idx, run in enumerate(doc.get("runs") or [cfg]):
        lines.append(f"- Run {idx}: sizes {run['sizes']}, batches {run['batches']}, {len(run['heads'])} heads; "
                     f"warm-up {run['warmup']}, up to {run['iters']} timed calls (at least {run['min_iters']}, "
                     f"timed phase capped at {run['max_seconds']} s)")
    peaks = doc.get("device_peak") or {}
    for key, entry in peaks.items():
        if entry:
            lines.append(f"- Measured peak `{key}`: {entry['flops_per_s'] / 1e9:.1f} GFLOP/s "
                         f"({entry['dtype']} {entry['n']}x{entry['n']} matmul, {entry.get('library', 'torch')}, "
                         f"{entry.get('threads')} threads; "
                         f"best of {entry.get('measurements', 1)} measurement(s))")
    lines += ["", "**Caveat.** " + " ".join(doc.get("caveats", [])), ""]
    lines += ["Speed-up = p50 of the PyTorch FP32 reference / p50 of the backend (same head, size, batch). "
              "% of floor = (analytic FLOPs of the call / measured matmul peak) / p50: how close the backend "
              "gets to the compute floor. max|d| = largest absolute difference of the scores from the "
              "reference on one random image (cosine scores in [-1, 1]; probabilities for clip-dinoiser). "
              "Peak RSS = VmHWM of the whole benchmark process (reset before each backend's warm-up), i.e. "
              "with every backend of that head loaded at once: an upper bound, not one backend's footprint. "
              "Timed calls are interleaved across backends (one call each per round).", ""]

    backends = _backends_in(doc)
    for batch in cfg["batches"][:1]:
        lines += [f"## Headline: p50 latency per image at batch {batch} (ms, speed-up vs the PyTorch reference)", ""]
        lines.append("| size | head | " + " | ".join(labels.get(b, b) for b in backends) + " |")
        lines.append("|---|---|" + "---|" * len(backends))
        for row in headline_rows(doc, batch):
            cells = []
            for b in backends:
                if b in row:
                    p50, sp = row[b]
                    cells.append(f"{p50 * 1e3:.0f} ({sp:.2f}x)" if sp else f"{p50 * 1e3:.0f}")
                else:
                    cells.append("-")
            lines.append(f"| {row['size']} | {row['head']} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## All measurements", ""]
    lines.append("| size | head | backend | batch | p50 ms | p90 ms | p99 ms | mean ms | img/s | speed-up | "
                 "% floor | GFLOP/img | peak RSS MB | max\\|d\\| | iters | load 1m before/after |")
    lines.append("|" + "---|" * 16)
    for rec in sorted((r for r in doc["results"] if r.get("status") == "ok"),
                      key=lambda r: (r["size"], r["head"], backends.index(r["backend"]), r["batch"])):
        lat = rec["latency"]
        frac = rec.get("fraction_of_floor")
        lines.append(
            f"| {rec['size']} | {rec['head']} | {labels.get(rec['backend'], rec['backend'])} | {rec['batch']} | "
            f"{_ms(lat['p50_s'])} | {_ms(lat['p90_s'])} | {_ms(lat['p99_s'])} | {_ms(lat['mean_s'])} | "
            f"{lat['images_per_s']:.2f} | {_num(rec.get('speedup_vs_reference'), '.2f')} | "
            f"{_num(None if frac is None else 100 * frac, '.1f')} | {rec['flops_per_image'] / 1e9:.3g} | "
            f"{_num(rec.get('host_peak_rss_mb'), '.0f')} | {_diff(rec.get('max_abs_diff_vs_reference'))} | "
            f"{lat['iters']} | {_load(rec)} |")
    lines.append("")
    staged = [r for r in doc["results"] if r.get("status") == "ok" and r.get("stages_p50_s")]
    if staged:
        names = [n for n in ("decode", "resize", "windows", "model", "protocol", "postprocess", "write")
                 if any(n in r["stages_p50_s"] for r in staged)]
        lines += ["## End-to-end stages (p50 ms per image; host = resize + windows + protocol + "
                  "postprocess)", ""]
        lines.append("| size | head | backend | batch | " + " | ".join(names) + " | host / model |")
        lines.append("|" + "---|" * (len(names) + 5))
        for rec in staged:
            st = rec["stages_p50_s"]
            host = sum(st.get(n, 0.0) for n in ("resize", "windows", "protocol", "postprocess"))
            ratio = f"{100 * host / st['model']:.1f} %" if st.get("model") else "-"
            lines.append(f"| {rec['size']} | {rec['head']} | {labels.get(rec['backend'], rec['backend'])} | "
                         f"{rec['batch']} | " + " | ".join(_ms(st.get(n)) for n in names) + f" | {ratio} |")
        lines.append("")
    frames = [r for r in doc["results"] if r.get("status") == "ok" and r.get("frame_graph")]
    if frames:
        lines += ["## Frame graphs end to end (the host only decodes and writes; targets: e2e >= 50 % of "
                  "model-only throughput, host share <= 10 %)", ""]
        lines.append("| size | head | backend | frames per call | model-only frames/s | e2e frames/s | "
                     "e2e / model | host share | decode ms | model ms | write ms | targets |")
        lines.append("|" + "---|" * 12)
        for rec in frames:
            fg = rec["frame_graph"]
            st = fg.get("stages_p50_s", {})
            met = "met" if all(fg.get("targets", {}).values()) else "NOT met"
            lines.append(f"| {rec['size']} | {rec['head']} | {rec['backend']} | {rec['batch']} | "
                         f"{fg['model_frames_per_s']:.1f} | {fg['e2e_frames_per_s']:.1f} | "
                         f"{100 * fg['e2e_over_model']:.0f} % | {100 * fg['host_share']:.0f} % | "
                         f"{_ms(st.get('decode'))} | {_ms(st.get('model'))} | {_ms(st.get('write'))} | {met} |")
        lines.append("")
    not_run = {}
    for rec in doc["results"]:
        if rec.get("status") != "ok":
            not_run.setdefault((rec["backend"], rec["status"], rec.get("reason")), set()).add(
                f"{rec['head']}@{rec['size']}")
    if not_run:
        lines += ["## Not measured here", ""]
        for (backend, status, reason), where in sorted(not_run.items(), key=lambda kv: kv[0][0]):
            lines.append(f"- `{backend}` {status} ({len(where)} head/size pairs): {reason}")
        lines.append("")
    flops = doc.get("flops") or {}
    if flops:
        lines += ["## FLOP model (GFLOP per image; multiply-add = 2 FLOPs)", ""]
        parts = sorted({k for per_size in flops.values() for b in per_size.values() for k in b if k != "total"})
        lines.append("| head | size | " + " | ".join(parts) + " | total |")
        lines.append("|---|---|" + "---|" * (len(parts) + 1))
        for head, per_size in flops.items():
            for size, b in per_size.items():
                lines.append(f"| {head} | {size} | " + " | ".join(
                    f"{b[p] / 1e9:.2f}" if p in b else "-" for p in parts) + f" | {b['total'] / 1e9:.2f} |")
        lines.append("")
    return "\n".join(lines)
