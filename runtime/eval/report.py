"""Evaluation records: resumable JSON written as the run goes, and the Markdown report.

The JSON holds the confusion matrix of every run (deployed, and the PyTorch reference with
`--compare-reference`) together with the ids already scored; both are written in one atomic
rename, so after an interruption the matrix and the id list always agree and `--resume` continues
exactly where the last save left off.
"""
from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import ClipfuseError
from ..fileio import write_text_atomic
from ..methods import METHODS, PAPER_COLUMNS
from .metrics import ConfusionMatrix, summarize

FORMAT = "clipfuse-eval"
FORMAT_VERSION = 1
DATASET_ORDER = PAPER_COLUMNS

# Published mIoU (%), ViT-B/16, per method (MethodSpec.published_miou).
PAPER_MIOU: Dict[str, Dict[str, float]] = {name: dict(m.published_miou) for name, m in METHODS.items()
                                           if m.published_miou}

# Keys that must match for --resume to continue a record rather than mix two different runs.
IDENTITY_KEYS = ("model_id", "head", "dataset", "num_classes", "class_names", "runs",
                 "protocol_overrides", "requested_backend")


def paper_miou(head: Optional[str], dataset: str) -> Optional[float]:
    return PAPER_MIOU.get(head or "", {}).get(dataset)


class EvalRecord:
    """Confusion matrices + finished ids of one evaluation, saved atomically to `path`."""

    def __init__(self, path: Path, meta: Dict[str, object], save_interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.meta = dict(meta)
        k = int(self.meta["num_classes"])
        self.matrices = {name: ConfusionMatrix(k) for name in self.meta["runs"]}
        self.done: List[str] = []
        self._done_set = set()
        self.agree_pixels = 0
        self.compared_pixels = 0
        self.finished = False
        self.save_interval_s = save_interval_s
        self._last_save = 0.0

    # --- lifecycle ---
    @classmethod
    def start(cls, path: "str | Path", meta: Dict[str, object], resume: bool,
              save_interval_s: float = 2.0) -> "EvalRecord":
        path = Path(path)
        record = cls(path, meta, save_interval_s)
        if path.exists():
            if not resume:
                raise ClipfuseError(f"{path} already holds results; pass --resume to continue it "
                                    f"or choose another --out")
            record._load()
        return record

    def _load(self) -> None:
        from ..limits import load_json_text

        try:
            data = load_json_text(self.path.read_text(encoding="utf-8"), f"cannot resume from {self.path}")
        except (OSError, UnicodeDecodeError) as exc:
            raise ClipfuseError(f"cannot resume from {self.path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ClipfuseError(f"{self.path} is not a clipfuse-eval v{FORMAT_VERSION} record")
        meta, confusion, done = data.get("meta"), data.get("confusion"), data.get("done_ids")
        if not isinstance(meta, dict) or not isinstance(confusion, dict) or not isinstance(done, list) \
                or not all(isinstance(i, str) for i in done):
            raise ClipfuseError(f"cannot resume from {self.path}: meta, confusion or done_ids is malformed")
        for key in IDENTITY_KEYS:
            if _jsonable(meta.get(key)) != _jsonable(self.meta.get(key)):
                raise ClipfuseError(
                    f"cannot resume {self.path}: it was made with {key}={meta.get(key)!r}, "
                    f"this run has {self.meta.get(key)!r}; use another --out")
        try:
            for name, rows in confusion.items():
                self.matrices[name] = ConfusionMatrix.from_list(rows)
            agreement = data.get("agreement", {})
            self.agree_pixels = int(agreement.get("equal_pixels", 0))
            self.compared_pixels = int(agreement.get("pixels", 0))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ClipfuseError(f"cannot resume from {self.path}: malformed confusion matrix or "
                                f"agreement ({str(exc).splitlines()[0][:80]})") from None
        self.done = list(done)
        self._done_set = set(self.done)

    def is_done(self, sample_id: str) -> bool:
        return sample_id in self._done_set

    def add(self, sample_id: str, predictions: Dict[str, np.ndarray], label: np.ndarray) -> None:
        """Score one image for every run; saves when the last save is older than the interval."""
        for name, pred in predictions.items():
            self.matrices[name].update(pred, label)
        if len(predictions) == 2:
            first, second = predictions.values()
            valid = label != self.matrices[next(iter(predictions))].ignore_index
            self.agree_pixels += int(np.count_nonzero((first == second) & valid))
            self.compared_pixels += int(np.count_nonzero(valid))
        self.done.append(sample_id)
        self._done_set.add(sample_id)
        if time.monotonic() - self._last_save >= self.save_interval_s:
            self.save()

    def save(self, finished: bool = False) -> None:
        self.finished = finished
        write_text_atomic(self.path, json.dumps(self.to_dict(), indent=1) + "\n")
        self._last_save = time.monotonic()

    # --- views ---
    def summary(self, run: str) -> Dict[str, object]:
        return summarize(self.matrices[run].counts, self.meta["class_names"])

    def agreement(self) -> Optional[float]:
        return 100.0 * self.agree_pixels / self.compared_pixels if self.compared_pixels else None

    def to_dict(self) -> Dict[str, object]:
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": self.finished,
            "meta": self.meta,
            "images_done": len(self.done),
            "results": {name: self.summary(name) for name in self.matrices},
            "confusion": {name: m.to_list() for name, m in self.matrices.items()},
            "done_ids": self.done,
        }
        if len(self.matrices) == 2:
            data["agreement"] = {"equal_pixels": self.agree_pixels, "pixels": self.compared_pixels,
                                 "percent": self.agreement()}
        return data


def _jsonable(value):
    return json.loads(json.dumps(value))


def fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown_report(record: EvalRecord) -> str:
    """The human-readable report: measured vs paper mIoU, reference delta, per-class IoU."""
    meta = record.meta
    runs = list(record.matrices)
    summaries = {name: record.summary(name) for name in runs}
    paper = paper_miou(meta.get("head"), meta["dataset"])
    lines = [
        f"# clipfuse eval: {meta.get('model_name', meta.get('model'))} on {meta['dataset_title']}",
        "",
        f"- model: `{meta.get('model')}` (head `{meta.get('head')}`, weights "
        f"`{meta.get('pretrained')}`, {meta.get('precision', '?')})",
        f"- dataset: {meta['dataset_title']} at `{meta.get('root')}`, "
        f"{len(record.done)} of {meta.get('dataset_size')} validation images"
        + ("" if record.finished else " (unfinished: rerun with --resume)"),
        f"- protocol: {json.dumps(meta.get('protocol'))}",
        "- backends: " + ", ".join(f"{name} = `{meta['backends'][name]}`" for name in runs),
        "",
        "| run | mIoU | aAcc | paper mIoU | measured - paper |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in runs:
        miou = summaries[name]["mIoU"]
        delta = None if paper is None or miou is None else miou - paper
        lines.append(f"| {name} | {fmt(miou)} | {fmt(summaries[name]['aAcc'])} | {fmt(paper)} "
                     f"| {fmt(delta, signed=True)} |")
    notes = _comparability_notes(meta, len(record.done))
    if notes:
        lines += [""] + [f"> {note}" for note in notes]
    if len(runs) == 2:
        a, b = (summaries[name]["mIoU"] for name in runs)
        delta = None if a is None or b is None else a - b
        lines += ["", f"Deployed - reference: mIoU {fmt(delta, signed=True)} points; "
                      f"pixel agreement of the two label maps {fmt(record.agreement())}% "
                      f"of scored pixels."]
    lines += ["", "## Per-class IoU", "", "| class | " + " | ".join(runs) + " |",
              "|---|" + "---:|" * len(runs)]
    for cls in meta["class_names"]:
        lines.append(f"| {cls} | " + " | ".join(fmt(summaries[n]["per_class_IoU"][cls]) for n in runs)
                     + " |")
    lines.append("")
    lines.append("— = class absent from both ground truth and prediction (excluded from the mean).")
    return "\n".join(lines) + "\n"


def _comparability_notes(meta: Dict[str, object], done: int) -> List[str]:
    notes = []
    if done < int(meta.get("dataset_size") or 0):
        notes.append(f"Only {done} of {meta.get('dataset_size')} images: not comparable to the "
                     f"paper's full-split number.")
    if meta.get("pretrained") not in (None, meta.get("paper_pretrained")):
        notes.append(f"Weights `{meta.get('pretrained')}` differ from the paper's "
                     f"`{meta.get('paper_pretrained')}`.")
    return notes


def write_report(record: EvalRecord, path: "str | Path") -> Path:
    path = Path(path)
    write_text_atomic(path, markdown_report(record))
    return path
