"""One `clipfuse bench` session: the results document (new, or appended to an earlier one),
matmul peaks, FLOPs, the measurements of benchmarks.suite, and the JSON/Markdown/plots written as
results arrive (the library behind the command)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clipfuse.runtime.errors import ClipfuseError

if TYPE_CHECKING:  # --render-only needs none of the measuring code
    from .suite import BenchConfig


def _log(message: str) -> None:
    print(f"clipfuse bench: {message}", file=sys.stderr)


def render(doc: dict, stem: Path, plots: bool) -> None:
    """STEM.json + STEM.md (+ plots) from the document."""
    from clipfuse.runtime.fileio import write_text_atomic

    from .report import add_derived, render_markdown, write_json
    add_derived(doc)
    write_json(doc, Path(f"{stem}.json"))
    write_text_atomic(Path(f"{stem}.md"), render_markdown(doc))
    if plots and any(r.get("status") == "ok" for r in doc["results"]):
        from .plots import write_plots
        for path in write_plots(doc, stem):
            _log(f"wrote {path}")


def _measure_peaks() -> dict:
    import torch

    from . import timing
    _log("measuring the matmul peak")
    peaks = {"cpu_fp32": timing.measure_matmul_peak("cpu", "float32")}
    if torch.cuda.is_available():
        peaks["cuda_fp16"] = timing.measure_matmul_peak("cuda", "float16")
        peaks["cuda_fp32"] = timing.measure_matmul_peak("cuda", "float32")
    return peaks


def _appended(json_path: Path, cfg: BenchConfig, peaks: dict, flops: dict) -> dict:
    """The earlier document with this run added; a re-measured configuration replaces its records."""
    from .report import merge_peak, read_json
    doc = read_json(json_path)
    if (doc["config"]["model"], doc["config"]["scope"]) != (cfg.model, cfg.scope):
        raise ClipfuseError(f"--append: {json_path} holds {doc['config']['model']} scope "
                            f"{doc['config']['scope']}, not {cfg.model} scope {cfg.scope}")
    doc.setdefault("runs", [doc["config"]]).append(cfg.to_dict())
    for head, per_size in flops.items():
        doc["flops"].setdefault(head, {}).update(per_size)
    for key, entry in peaks.items():
        merge_peak(doc, key, entry)
    again = {(h, s, b, n) for h in cfg.heads for s in cfg.sizes for b in cfg.batches for n in cfg.backends}
    doc["results"] = [r for r in doc["results"] if (r["head"], r["size"], r["batch"], r["backend"]) not in again]
    for key in ("sizes", "batches", "heads", "backends"):
        doc["config"][key] = sorted(set(doc["config"][key]) | set(getattr(cfg, key)),
                                    key=(doc["config"][key] + getattr(cfg, key)).index)
    return doc


def run_bench(cfg: BenchConfig, stem: Path, *, append: bool = False, measure_peak: bool = True,
              plots: bool = True) -> dict:
    """Measure everything in `cfg` into STEM.json/.md (rewritten after each measurement)."""
    import torch

    from . import timing
    from .flops import VitShape, head_flops
    from .report import machine_info, merge_peak, new_document
    from .suite import run_suite

    torch.set_num_threads(cfg.threads)
    peaks = _measure_peaks() if measure_peak else {}
    shape = VitShape.from_config(cfg.model)
    n_names = sum(len(c) for c in cfg.classes)
    flops = {h: {str(s): head_flops(h, shape, s, n_names) for s in cfg.sizes} for h in cfg.heads}
    json_path = Path(f"{stem}.json")
    if append and json_path.exists():
        doc = _appended(json_path, cfg, peaks, flops)
    else:
        doc = new_document(cfg.to_dict(), machine_info(cfg.threads), peaks, flops)
    run_index = len(doc["runs"]) - 1

    def on_result(rec: dict) -> None:
        rec["run"] = run_index
        doc["results"].append(rec)
        render(doc, stem, plots=False)  # the JSON and tables grow as measurements finish

    run_suite(cfg, on_result)
    doc["machine"]["load_average_at_end"] = timing.load_average()
    if measure_peak:  # again at the end: on a shared machine the start may have been a busy moment
        merge_peak(doc, "cpu_fp32", timing.measure_matmul_peak("cpu", "float32"))
    render(doc, stem, plots)
    return doc
