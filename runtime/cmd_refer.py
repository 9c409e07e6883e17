"""`clipfuse refer`: segment the object a sentence refers to (Global-Local CLIP, no PyTorch)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cliargs import fraction

ORDER = 110  # place in `clipfuse --help`
HELP = "referring segmentation: pick the mask proposal that matches a sentence (Global-Local CLIP)"

DESCRIPTION = """\
Zero-shot referring segmentation with the graphs of `clipfuse export-refer` (Global-Local CLIP):
every mask proposal gets a global (token-masked) and a local (masked crop) CLIP feature, the
sentence a text feature 0.5*enc(sentence) + 0.5*enc(noun phrase); the proposal with the highest
cosine is the answer.

Proposals: --masks FILE (a folder of PNGs, a multi-frame image, a PNG label map, NPZ [N,H,W], or
COCO RLE/polygon JSON), at the image's resolution; float NPZ masks stay soft (values in [0, 1]:
the global branch weights tokens by them, the local crop keeps pixels == 1, as the public code).
Without --masks, clipfuse makes them itself,
training-free: regions of a dense clipfuse model's label map (--dense engines/x.onnx) plus
colour/position clusters (colour clusters alone without --dense).

Writes into OUT:
  NAME.mask.png      the best mask (0 / 255)
  NAME.overlay.png   the photo with the best mask highlighted
  NAME.refer.json    sentence, noun phrase, alpha, and every proposal ranked by score (+ box, area)

examples:
  clipfuse refer photo.jpg "the cat lying on the scooter seat" --graphs engines/refer-b32 -o out/
  clipfuse refer photo.jpg "man in red on the left" --graphs engines/refer-b32 --masks props.npz -o out/
  clipfuse refer photo.jpg "left zebra" --graphs engines/refer-b32 --dense engines/sclip.onnx -o out/
The noun phrase uses spaCy when installed (pip install 'clipfuse[refer]' && python -m spacy download
en_core_web_lg, the public code's model), else a built-in heuristic (--parser heuristic forces it).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="the photo (JPEG, PNG, ...)")
    parser.add_argument("text", help='the referring expression, e.g. "the dog on the left"')
    parser.add_argument("-g", "--graphs", required=True,
                        help="prefix of `clipfuse export-refer` output: PREFIX-global.onnx, PREFIX-local.onnx "
                             "(and PREFIX-text.onnx unless --text-graph is given)")
    parser.add_argument("--text-graph", dest="text_graph", default=None,
                        help="text encoder graph (clipfuse export-text) if not PREFIX-text.onnx")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--masks", default=None, help="proposal file or folder (see above)")
    source.add_argument("--dense", default=None,
                        help="dense clipfuse model (.onnx/.engine) whose label-map regions become proposals")
    parser.add_argument("--alpha", type=fraction, default=None,
                        help="f = alpha*global + (1-alpha)*local (default: the manifest's, 0.95; RefCOCOg 0.85)")
    parser.add_argument("--fill", choices=["public", "mean"], default=None,
                        help="colour outside the mask in local crops (default: the manifest's)")
    parser.add_argument("--parser", choices=["auto", "spacy", "heuristic"], default="auto",
                        help="noun-phrase parser (default: %(default)s = spaCy if installed)")
    parser.add_argument("--backend", default="auto",
                        help="auto, ort-cpu, ort-cuda, ort-trt, tensorrt (default: %(default)s)")
    parser.add_argument("-o", "--out", required=True, help="output folder (created)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from .fileio import atomic_path, write_text_atomic
    from .imageio import read_image
    from .outputs import save_overlay_png
    from .refer.masks import check_proposals, generate_proposals, hard_masks, load_proposals
    from .refer.nounphrase import extract_noun_phrase
    from .refer.pipeline import ReferSegmenter, mask_boxes

    extract_noun_phrase(args.text, args.parser)        # bad sentence: fail before any heavy work
    image = read_image(args.image)
    if args.masks:
        raw = load_proposals(args.masks)
        source = str(args.masks)
    else:
        print("clipfuse refer: generating proposals "
              f"({'dense model + ' if args.dense else ''}colour clusters)", file=sys.stderr)
        raw, source = generate_proposals(image, args.dense, args.backend)
    masks, kept = check_proposals(raw, image.shape[:2], source=f"--masks {args.masks}" if args.masks else source)
    if len(kept) < len(raw):
        print(f"clipfuse refer: dropped {len(raw) - len(kept)} empty mask(s)", file=sys.stderr)

    seg = ReferSegmenter.open(args.graphs, backend=args.backend, text=args.text_graph)
    try:
        text, phrase = seg.text_feature(args.text, args.parser)
        prepared = seg.prepare(image)
        f_global = seg.global_features(prepared, masks)
        f_local = seg.local_features(prepared, masks, args.fill)
        result = seg.rank(f_global, f_local, text, phrase, args.alpha)
    finally:
        seg.close()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    best = hard_masks(masks[result.best:result.best + 1])[0]
    from PIL import Image
    with atomic_path(out / f"{stem}.mask.png") as tmp:
        Image.fromarray(best.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    save_overlay_png(out / f"{stem}.overlay.png", image, best.astype(np.int64), ["background", phrase.phrase])
    boxes = mask_boxes(masks)
    ranked = [{"rank": r, "proposal": int(kept[i]), "score": round(float(result.scores[i]), 6),
               "area": int(hard_masks(masks[i:i + 1]).sum()), "box_xyxy": [int(v) for v in boxes[i]]}
              for r, i in enumerate(result.ranking())]
    report = {"image": str(args.image), "height": int(image.shape[0]), "width": int(image.shape[1]),
              "sentence": args.text, "encoded_sentence": phrase.sentence, "noun_phrase": phrase.phrase,
              "parser": phrase.parser, "alpha": result.alpha, "proposals": source,
              "num_proposals": len(masks), "best_proposal": int(kept[result.best]), "ranking": ranked}
    write_text_atomic(out / f"{stem}.refer.json", json.dumps(report, indent=2) + "\n")
    print(f"{args.image}: best proposal {int(kept[result.best])} of {len(masks)} (score {result.scores[result.best]:.4f}, "
          f"noun phrase {phrase.phrase!r}) -> {out}/{stem}.mask.png")
    return 0
