"""The evaluation loop and the checks around it (vocabulary vs dataset, per-dataset protocol).

Segmenters are passed in (anything with `.segment(image) -> result.labels`), so the loop is the
same for the deployed backend, the PyTorch reference and the fakes of the tests.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ClipfuseError
from ..manifest import ImageManifest, parse_manifest
from ..methods import METHODS, param_flag
from .datasets import DatasetSpec, EvalDataset, classes_file, first_names, open_dataset
from .metrics import mean_iou
from .report import EvalRecord, write_report

RESULTS_NAME = "results.json"
REPORT_NAME = "report.md"
# (model, backend, protocol overrides) -> a segmenter; the runtime's Segmenter.open, or a fake
SegmenterFactory = Callable[[Path, str, Dict[str, object]], object]


def protocol_overrides(head: Optional[str], dataset: str) -> Dict[str, object]:
    """The head's per-dataset protocol settings (methods.py), e.g. SCLIP's logit_scale 65 on VOC21."""
    spec = METHODS.get(head or "")
    if spec is None:
        return {}
    overrides = dict(spec.dataset_protocol.get(dataset, {}))
    spec.protocol_for(dataset)  # raises on a key Protocol does not know: a table bug, fail early
    return overrides


def export_hint(spec: DatasetSpec, head: Optional[str]) -> str:
    head_arg = head or "HEAD"
    return (f"clipfuse export --head {head_arg} --classes-file {classes_file(spec.key, head)} "
            f"-o engines/{head_arg}-{spec.key}  (path printed by `clipfuse eval "
            f"--print-classes-file {spec.key}" + (f" --head {head}" if head else "") + "`)")


def head_params_warning(head: Optional[str], dataset: str, manifest: "ImageManifest | dict") -> Optional[str]:
    """A warning when a graph's baked head parameters (e.g. RCS's lambda) differ from the ones the
    method's published evaluation uses on `dataset` (MethodSpec.dataset_head_params)."""
    method = METHODS.get(head or "")
    wanted = method.dataset_head_params.get(dataset, {}) if method else {}
    meta = parse_manifest(manifest)
    baked = (meta.head.params if getattr(meta, "head", None) else None) or {}
    off = {k: v for k, v in wanted.items() if k in baked and baked[k] != v}
    if not off:
        return None
    found = ", ".join(f"{k}={baked[k]}" for k in off)
    want = ", ".join(f"{k}={v}" for k, v in off.items())
    flags = [(param_flag(method.head_params, k), v) for k, v in off.items()]
    hint = (f" (clipfuse export --head {head} " + " ".join(f"{flag} {v}" for flag, v in flags) + ")"
            if all(flag for flag, _ in flags) else "")
    return f"this graph has {found} baked in; the published {dataset} evaluation uses {want}: re-export{hint}"


def background_rule_warning(head: Optional[str], dataset: str, protocol: dict) -> Optional[str]:
    """A warning when a CLIP-DINOiser graph's background rule differs from the paper's evaluation
    (MethodSpec.background_rule_datasets: where the published evaluation applies it)."""
    method = METHODS.get(head or "")
    if method is None or not method.has_background_rule or "background_rule" not in protocol:
        return None
    wanted = dataset in method.background_rule_datasets
    if bool(protocol["background_rule"]) == wanted:
        return None
    if wanted:
        return (f"the paper applies CLIP-DINOiser's background rule on {dataset} but this graph does "
                f"not (class 0 must be 'background' and --no-background-rule absent at export)")
    return (f"this graph applies CLIP-DINOiser's background rule, which the paper does not use on "
            f"{dataset}; re-export with --no-background-rule to match the published protocol")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def check_vocabulary(model_classes: Optional[Sequence[Sequence[str]]], spec: DatasetSpec,
                     head: Optional[str]) -> List[int]:
    """Raise if the class count differs; return the class indices whose names look different.

    Names are compared loosely (case, spaces, hyphens) against both shipped files, because a
    reordered vocabulary scores every class against the wrong ground truth without any error.
    """
    if model_classes is None:
        raise ClipfuseError("the model's manifest lists no classes; cannot check it against "
                            f"{spec.title}. Export one with: {export_hint(spec, head)}")
    if len(model_classes) != spec.num_classes:
        raise ClipfuseError(
            f"the model has {len(model_classes)} classes but {spec.title} has {spec.num_classes}; "
            f"export a matching model: {export_hint(spec, head)}")
    known = [first_names(classes_file(spec.key, h)) for h in (None, "sclip")]
    suspicious = []
    for idx, names in enumerate(model_classes):
        accepted = {_norm(ref[idx]) for ref in known}
        if not any(_norm(n) in accepted for n in names):
            suspicious.append(idx)
    return suspicious


def _labels_of(result, image: np.ndarray, run: str, num_classes: int) -> np.ndarray:
    labels = np.asarray(getattr(result, "labels", result))
    if labels.shape != image.shape[:2]:
        raise ClipfuseError(f"{run} segmenter returned labels of shape {labels.shape} for an image "
                            f"of {image.shape[:2]}; expected one label per image pixel")
    names = getattr(result, "class_names", None)
    if names is not None and len(names) != num_classes:
        raise ClipfuseError(f"{run} segmenter has {len(names)} classes, the dataset "
                            f"{num_classes}")
    return labels


def evaluate(dataset: EvalDataset, segmenters: Dict[str, object], record: EvalRecord,
             limit: Optional[int] = None, progress: bool = True) -> EvalRecord:
    """Score the first `limit` images (all when None) not yet in `record`; save when done.

    The record is saved on the way out also after an error or Ctrl-C, so --resume loses nothing.
    """
    from tqdm import tqdm

    count = len(dataset) if limit is None else max(0, min(int(limit), len(dataset)))
    ids = dataset.ids
    todo = [i for i in range(count) if not record.is_done(ids[i])]
    first_run = next(iter(segmenters))
    complete = False
    bar = tqdm(total=count, initial=count - len(todo), desc=dataset.spec.title, unit="img",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for index in todo:
            sample = dataset.load(index)
            predictions = {run: _labels_of(seg.segment(sample.image), sample.image, run,
                                           dataset.num_classes)
                           for run, seg in segmenters.items()}
            record.add(sample.id, predictions, sample.label)
            bar.set_postfix_str(f"mIoU {100 * mean_iou(record.matrices[first_run].counts):.2f}",
                                refresh=False)
            bar.update(1)
        complete = True
    finally:
        bar.close()
        record.save(finished=complete)
    return record


@dataclass
class EvalOutcome:
    record: EvalRecord
    report: Path
    out: Path
    spec: DatasetSpec
    head: Optional[str]
    runs: List[str]


def _warn(message: str) -> None:
    print(f"clipfuse eval: warning: {message}", file=sys.stderr)


def evaluate_model(model: Path, dataset: str, root: "str | Path", open_segmenter: SegmenterFactory, *,
                   backend: str = "auto", out: Optional[Path] = None, limit: Optional[int] = None,
                   resume: bool = False, compare_reference: bool = False, progress: bool = True,
                   warn: Callable[[str], None] = _warn) -> EvalOutcome:
    """Evaluate `model` on `dataset` with the method's per-dataset protocol: check the vocabulary
    and the background rule against the dataset (warnings through `warn`), start or resume the
    record in `out` (default eval-results/MODEL-DATASET), run the deployed segmenter (and the
    PyTorch reference with `compare_reference`), and write the Markdown report even when stopped."""
    from ..artifact import open_artifact

    # kind + contract here; the segmenter opened below checks the file's hash
    manifest = open_artifact(model, kinds=("image",), verify=False,
                             hint="`eval` needs an image graph from `clipfuse export`").meta
    head = manifest.head_name

    data = open_dataset(dataset, root)
    spec = data.spec
    suspicious = check_vocabulary(manifest.classes or None, spec, head)
    class_names = first_names(classes_file(spec.key))
    if suspicious:
        idx = suspicious[0]
        warn(f"{len(suspicious)} class name(s) of the model differ from {spec.title}'s, e.g. class {idx}: "
             f"model {list(manifest.classes[idx])!r} vs dataset {class_names[idx]!r}; check the class order")
    overrides = protocol_overrides(head, spec.key)
    protocol = dict(manifest.protocol or {}, **overrides)
    for warning in (background_rule_warning(head, spec.key, protocol),
                    head_params_warning(head, spec.key, manifest)):
        if warning:
            warn(warning)
    runs = ["deployed"] + (["reference"] if compare_reference else [])
    method = METHODS.get(head or "")
    meta = {
        "model": str(model), "model_name": model.stem,
        "model_id": f"{model.name}:{manifest.onnx_sha256}",
        "head": head, "pretrained": manifest.pretrained,
        "paper_pretrained": method.default_pretrained if method else None,
        "precision": manifest.precision,
        "dataset": spec.key, "dataset_title": spec.title, "root": str(data.root),
        "dataset_size": len(data), "limit": limit,
        "num_classes": spec.num_classes, "class_names": class_names,
        "protocol": protocol, "protocol_overrides": overrides,
        "runs": runs, "requested_backend": backend,
        "backends": {run: ("torch" if run == "reference" else backend) for run in runs},
    }
    out = Path(out) if out else Path("eval-results") / f"{model.stem}-{spec.key}"
    record = EvalRecord.start(out / RESULTS_NAME, meta, resume=resume)

    segmenters = {"deployed": open_segmenter(model, backend, overrides)}
    if compare_reference:
        segmenters["reference"] = open_segmenter(model, "torch", overrides)
    for run_name, seg in segmenters.items():
        actual = getattr(getattr(seg, "backend", None), "name", None)
        if isinstance(actual, str):
            record.meta["backends"][run_name] = actual

    try:
        evaluate(data, segmenters, record, limit=limit, progress=progress)
    finally:
        report = write_report(record, out / REPORT_NAME)
    return EvalOutcome(record=record, report=report, out=out, spec=spec, head=head, runs=runs)
