"""`clipfuse refer`: segment the object a sentence refers to (Global-Local CLIP, no PyTorch)."""
from __future__ import annotations

import argparse

from ..cliargs import fraction

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
    from ..backends.base import backend_help

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
                        help=backend_help())
    parser.add_argument("-o", "--out", required=True, help="output folder (created)")


def run(args: argparse.Namespace) -> int:
    from ..refer.single import refer_image

    outcome = refer_image(args.graphs, args.image, args.text, args.out, masks=args.masks, dense=args.dense,
                          text_graph=args.text_graph, backend=args.backend, parser=args.parser, fill=args.fill,
                          alpha=args.alpha)
    result, best = outcome.result, outcome.result.best
    print(f"{args.image}: best proposal {int(outcome.kept[best])} of {outcome.num_proposals} "
          f"(score {result.scores[best]:.4f}, noun phrase {result.noun_phrase.phrase!r}) -> {outcome.mask_path}")
    return 0
