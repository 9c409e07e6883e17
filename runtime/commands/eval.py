"""`clipfuse eval`: mIoU of a deployed model on a standard benchmark, beside the paper's number."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict

from ..cliargs import positive_int

ORDER = 90  # place in `clipfuse --help`
HELP = "measure mIoU of an exported model on VOC/Context/COCO/Cityscapes/ADE20K"

DESCRIPTION = """\
Measure the mIoU of a deployed model on one of the eight standard open-vocabulary segmentation
benchmarks, with the method's per-dataset protocol (methods.py), and write a resumable JSON record
plus a Markdown report that puts the paper's mIoU beside the measured one.

The model's vocabulary must be the dataset's classes, in the dataset's order. Export one with the
shipped class-name file (SCLIP's expanded-background files for sclip/clearclip/naclip):
  clipfuse export --head sclip --classes-file "$(clipfuse eval --print-classes-file voc21 --head sclip)" \\
      -o engines/sclip-voc21
  clipfuse eval engines/sclip-voc21.onnx --dataset voc21 --root data/VOCdevkit/VOC2012

datasets (--root may also be the folder that contains the named top folder):
  voc21, voc20       VOCdevkit/VOC2012: JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt
  context60/59       VOCdevkit/VOC2010: JPEGImages, SegmentationClassContext,
                     ImageSets/SegmentationContext/val.txt (mmseg's converted Context labels)
  coco-object        images/val2017/*.jpg, annotations/val2017/*_instanceTrainIds.png
  coco-stuff164k     images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png
  cityscapes         leftImg8bit/val/CITY/*_leftImg8bit.png, gtFine/val/CITY/*_gtFine_labelIds.png
  ade20k             ADEChallengeData2016/{images,annotations}/validation

examples:
  clipfuse eval engines/sclip-voc21.engine --dataset voc21 --root data/VOCdevkit/VOC2012
  clipfuse eval engines/sclip-voc21.onnx --dataset voc21 --root data/VOCdevkit --limit 50
  clipfuse eval engines/sclip-voc21.onnx --dataset voc21 --root data/VOCdevkit --resume
  clipfuse eval engines/sclip-voc21.onnx --dataset voc21 --root data/VOCdevkit --compare-reference
"""



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..backends.base import backend_help

    parser.add_argument("model", nargs="?", help="exported model: .onnx or .engine with its .json beside")
    parser.add_argument("--dataset", help="voc21, voc20, context60, context59, coco-object, "
                                          "coco-stuff164k, cityscapes or ade20k")
    parser.add_argument("--root", help="dataset folder (layouts above)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="score only the first N validation images (sorted ids; default: all)")
    parser.add_argument("--backend", default="auto",
                        help=backend_help())
    parser.add_argument("--out", default=None,
                        help="folder for results.json and report.md "
                             "(default: eval-results/MODEL-DATASET)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the record in --out: skip scored images, keep their counts")
    parser.add_argument("--compare-reference", action="store_true",
                        help="also run the PyTorch reference (backend 'torch', needs the export "
                             "extra) on the same images and report deployed-vs-reference delta")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-classes-file", metavar="DATASET", default=None,
                        help="print the path of the shipped class-name file of DATASET and exit")
    parser.add_argument("--head", default=None,
                        help="with --print-classes-file: the head whose published names to use "
                             "(sclip/clearclip/naclip use SCLIP's expanded files)")


def open_segmenter(model: Path, backend: str, overrides: Dict[str, object]):
    try:
        from ..segmenter import Segmenter
    except ImportError as exc:
        from ..errors import ClipfuseError
        raise ClipfuseError(f"the runtime segmenter is not usable here: {exc}") from None
    return Segmenter.open(model, backend=backend, **overrides)


def run(args: argparse.Namespace) -> int:
    return evaluate_command(args)


def evaluate_command(args: argparse.Namespace, segmenter_factory: Callable[[Path, str, Dict[str, object]], object]
                     = open_segmenter) -> int:
    """Validate the arguments, run runtime.eval.runner.evaluate_model, print the summary."""
    from ..errors import ClipfuseError
    from ..eval import datasets as ds
    from ..eval.report import fmt, paper_miou
    from ..eval.runner import RESULTS_NAME, evaluate_model

    if args.print_classes_file:
        print(ds.classes_file(args.print_classes_file, args.head))
        return 0
    for flag, value in (("MODEL", args.model), ("--dataset", args.dataset), ("--root", args.root)):
        if not value:
            raise ClipfuseError(f"{flag} is required (see clipfuse eval --help)")
    if args.limit is not None and args.limit < 1:
        raise ClipfuseError("--limit must be a positive number of images")
    model = Path(args.model)
    if not model.is_file():
        raise ClipfuseError(f"model not found: {model}")
    outcome = evaluate_model(model, args.dataset, args.root, segmenter_factory, backend=args.backend,
                             out=Path(args.out) if args.out else None, limit=args.limit, resume=args.resume,
                             compare_reference=args.compare_reference, progress=not args.no_progress)
    record, spec = outcome.record, outcome.spec
    paper = paper_miou(outcome.head, spec.key)
    for run_name in outcome.runs:
        s = record.summary(run_name)
        paper_txt = "" if paper is None or s["mIoU"] is None else \
            f" (paper {paper:.1f}, {s['mIoU'] - paper:+.2f})"
        print(f"{spec.title} {run_name}: mIoU {fmt(s['mIoU'])}{paper_txt}, aAcc {fmt(s['aAcc'])}, "
              f"{len(record.done)} images")
    if args.compare_reference:
        a, b = (record.summary(r)["mIoU"] for r in outcome.runs)
        if a is not None and b is not None:
            print(f"deployed - reference: {a - b:+.2f} mIoU points, pixel agreement "
                  f"{record.agreement():.2f}%")
    print(f"record: {outcome.out / RESULTS_NAME}\nreport: {outcome.report}")
    return 0
