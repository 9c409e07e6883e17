"""`clipfuse eval-refer`: oIoU / mIoU of Global-Local CLIP on RefCOCO, RefCOCO+ or RefCOCOg."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cliargs import fraction, positive_int

ORDER = 120  # place in `clipfuse --help`
HELP = "evaluate referring segmentation (oIoU, mIoU) on RefCOCO/RefCOCO+/RefCOCOg from a local copy"

DESCRIPTION = """\
Evaluate the `clipfuse export-refer` graphs on a local copy of the REFER annotations:
  DATA/refcoco/refs(unc).p  DATA/refcoco+/refs(unc).p  DATA/refcocog/refs(umd).p   (+ instances.json
  beside each), images in DATA/images/mscoco/images/train2014 (or --images).
Every sentence of every ref in the split is one sample; metrics at the original resolution:
oIoU = sum I / sum U, mIoU = mean per-sample IoU, P@0.5..0.9.

Proposals (per image):
  --masks-dir DIR        DIR/<image_id>.npz|.json|.png or DIR/<image file stem>.* (or a folder of PNGs)
  --oracle-proposals     all COCO instance masks of the image (validates the ranking alone)
  (neither)              clipfuse's training-free generator (--dense MODEL to use a dense model)
An image without proposals scores IoU 0 for its sentences (counted in `no_proposals`; the public
code skipped such images, which inflates its numbers slightly).
Pre-processing is the public code's (800-pixel copy, crops from it resized back, soft masks soft
for the global branch and == 1 for the crop). Images are read in the orientation the annotations
were drawn on: the stored pixels, as the public code (no EXIF transpose), unless only the
EXIF-upright size matches the annotation. A soft proposal counts as its pixels >= 0.5 for IoU.

examples:
  clipfuse eval-refer --graphs engines/refer-b32 --data ~/refer/data --dataset refcoco --split val \\
      --masks-dir freesolo_masks/ -o results/refcoco_val.json
  clipfuse eval-refer --graphs engines/refer-b32 --data ~/refer/data --dataset refcocog --oracle-proposals
The paper (ViT-B/32, FreeSOLO proposals) reports mIoU 26.20 on RefCOCO val, 33.52 on RefCOCOg val.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-g", "--graphs", required=True, help="prefix of `clipfuse export-refer` output")
    parser.add_argument("--text-graph", default=None, help="text graph if not PREFIX-text.onnx")
    parser.add_argument("--data", required=True, help="REFER data root (holds refcoco/, refcoco+/, refcocog/)")
    parser.add_argument("--dataset", choices=["refcoco", "refcoco+", "refcocog"], default="refcoco",
                        help="(default: %(default)s)")
    parser.add_argument("--split-by", choices=["unc", "umd", "google"], default=None,
                        help="annotation partition (default: unc; umd for refcocog)")
    parser.add_argument("--split", default="val", help="val, testA, testB, test, train or all (default: %(default)s)")
    parser.add_argument("--images", default=None, help="image folder (default: DATA/images/mscoco/images/train2014)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--masks-dir", default=None, help="folder of per-image proposal files")
    source.add_argument("--oracle-proposals", action="store_true",
                        help="use the image's ground-truth instance masks as proposals")
    source.add_argument("--dense", default=None, help="dense clipfuse model for the built-in generator")
    parser.add_argument("--alpha", type=fraction, default=None,
                        help="global/local mix (default: 0.95 refcoco/refcoco+, 0.85 refcocog)")
    parser.add_argument("--parser", choices=["auto", "spacy", "heuristic"], default="auto",
                        help="noun-phrase parser (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    parser.add_argument("--backend", default="auto", help="(default: %(default)s)")
    parser.add_argument("-o", "--output", default=None, help="write summary + per-sample results JSON here")


def run(args: argparse.Namespace) -> int:
    from ..errors import ClipfuseError
    from ..fileio import write_text_atomic
    from ..refer.dataset import ReferDataset
    from ..refer.evaluate import evaluate_refer
    from ..refer.pipeline import ReferSegmenter

    data = ReferDataset(args.data, args.dataset, args.split_by, args.split, args.images)
    masks_dir = Path(args.masks_dir) if args.masks_dir else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise ClipfuseError(f"--masks-dir {masks_dir} is not a folder")
    seg = ReferSegmenter.open(args.graphs, backend=args.backend, text=args.text_graph)
    try:
        alpha = seg.alpha_for(args.dataset) if args.alpha is None else args.alpha
        summary, samples = evaluate_refer(seg, data, alpha, oracle=args.oracle_proposals, masks_dir=masks_dir,
                                          dense=args.dense, backend=args.backend, parser=args.parser,
                                          limit=args.limit)
        summary["masked_blocks"] = seg.masked_blocks
    finally:
        seg.close()
    no_proposals = summary["no_proposals"]
    print(f"{data.name}: {summary['expressions']} expressions, oIoU {100 * summary['oIoU']:.2f}, "
          f"mIoU {100 * summary['mIoU']:.2f}, P@0.5 {100 * summary['P@0.5']:.2f}"
          + (f" ({no_proposals} without proposals)" if no_proposals else ""))
    if args.output:
        write_text_atomic(args.output, json.dumps({"summary": summary, "samples": samples}, indent=2) + "\n")
    return 0
