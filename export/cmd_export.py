"""`clipfuse export`: one fused ONNX graph (+ manifest) per head, model, vocabulary and size."""
from __future__ import annotations

import argparse

from clipfuse.runtime.cliargs import (fraction, int_range, logit_scale, non_negative_float, non_negative_int, on_off,
                                      opset, pixels)

ORDER = 20  # place in `clipfuse --help`
HELP = "export a dense head + cosine classifier as ONE fused ONNX graph with its manifest"
DESCRIPTION = """\
Fuse the modified last CLIP block of a dense head, its extra modules (CLIP-DINOiser's conv heads)
and a cosine classifier over precomputed, L2-normalised class embeddings into ONE ONNX graph
(opset 17), with a JSON manifest beside it (I/O contract, vocabulary, protocol defaults, sha256).

graph I/O:  image uint8 [batch, S, S, 3] (RGB, NHWC)  ->  scores float32 [batch, K, S/p, S/p]
            (cosine logits; CLIP-DINOiser: probabilities with its background rule)

examples:
  clipfuse export --head sclip --classes "sky,tree,road,car" -o engines/sclip-street
  clipfuse export --head clip-dinoiser --heads last.pt --classes-file voc21.txt -o engines/dino-voc
  clipfuse export --head naclip --pretrained ~/ckpt/ViT-B-16.pt --size 336 --classes "a,b" -o engines/x
  clipfuse export --head maskclip --pretrained none --templates single --classes "a,b" -o /tmp/smoke

classes: --classes "a,b,c" (one name per class) or "bg;person,people;car" (';' between classes,
',' between synonyms); --classes-file: one class per line, synonyms comma-separated, # comments.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from clipfuse.runtime.methods import METHODS

    parser.add_argument("--head", "--method", dest="head", required=True, choices=list(METHODS),
                        help="the method, i.e. its dense head (see `clipfuse heads`)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture name (default: %(default)s)")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip tag (e.g. openai, laion2b_s34b_b88k), a local checkpoint file in "
                             "open_clip or OpenAI format, or 'none' for random init (default: the head's "
                             "published weights, see `clipfuse heads`)")
    class_source = parser.add_mutually_exclusive_group(required=True)
    class_source.add_argument("--classes", help='class names, e.g. "sky,tree,road" or "bg;person,people;car"')
    class_source.add_argument("--classes-file", help="file with one class per line, synonyms comma-separated")
    parser.add_argument("--size", type=int_range(16, 4096), default=None,
                        help="input height = width in pixels, a multiple of the patch size; this is the "
                             "sliding-window size (default: the head's, e.g. 224 sclip, 448 clip-dinoiser)")
    parser.add_argument("--templates", choices=["imagenet80", "single"], default="imagenet80",
                        help="prompt templates averaged per class name (default: %(default)s)")
    parser.add_argument("--vocab", "--vocab-mode", dest="vocab", choices=["baked", "dynamic"], default="baked",
                        help="baked: class embeddings are graph constants; dynamic: an input "
                             "class_embeddings [K, E] so the vocabulary can change on the device")
    parser.add_argument("--heads", "--heads-checkpoint", dest="heads", default=None,
                        help="clip-dinoiser: CLIP-DINOiser checkpoint (checkpoints/last.pt), or 'none' for "
                             "random conv heads (tests only)")
    parser.add_argument("--quick-gelu", type=on_off, default=None, metavar="on|off",
                        help="activation of the weights: on = QuickGELU (OpenAI), off = GELU (LAION, DataComp). "
                             "Default: decided by the weights (tag, OpenAI-format file, *-quickgelu model); "
                             "required for open_clip-format files, which do not record it")
    parser.add_argument("--attn", choices=["qk", "qq", "kk", "qq+kk", "identity"], default=None,
                        help="self-correlation heads: override the attention form")
    parser.add_argument("--rcs-lambda", type=non_negative_float, default=None, metavar="LAM",
                        help="rcs: weight of the mean attention of blocks 5..8 (baked into the graph); "
                             "ResCLIP's per dataset: VOC21/Context60/ADE20k 0.3, COCO-Object/Context59/"
                             "COCO-Stuff 0.4, VOC20 0.6, Cityscapes 0.2 (default 0.3)")
    parser.add_argument("--rcs-blocks", type=_block_list, default=None, metavar="I,J,..",
                        help="rcs: 0-based blocks whose attention probabilities are averaged (ResCLIP, "
                             "ViT-B/16: 5,6,7,8; other depths are not specified by ResCLIP)")
    parser.add_argument("--gaussian-sigma", type=non_negative_float, default=None,
                        help="self-correlation heads: Gaussian spatial bias sigma (0 = none)")
    parser.add_argument("--residual", type=on_off, default=None, metavar="on|off",
                        help="self-correlation heads: keep the last block's residual")
    parser.add_argument("--ffn", type=on_off, default=None, metavar="on|off",
                        help="self-correlation heads: keep the last block's FFN")
    parser.add_argument("--no-background-rule", action="store_true",
                        help="clip-dinoiser: do not apply the background rule in the graph")
    parser.add_argument("--allow-duplicate-names", action="store_true",
                        help="accept one name in two classes (SCLIP's COCO-Object file lists 'bed' as a "
                             "background synonym too); the first class wins ties, as in SCLIP")
    parser.add_argument("--frame", default=None, metavar="WxH",
                        help="write a frame graph for this fixed frame size (e.g. 1280x720): uint8 frames "
                             "in, per-pixel labels + confidence out, the whole protocol inside "
                             "(see README 'C++ / DeepStream')")
    for flag, what, kind in (("--logit-scale", "logit scale", logit_scale),
                             ("--prob-thd", "probability threshold (0-1)", fraction),
                             ("--area-thd", "area threshold (0-1)", fraction),
                             ("--short-side", "short side (pixels)", pixels),
                             ("--stride", "window stride (pixels)", pixels)):
        parser.add_argument(flag, type=kind, default=None, help=f"frame graphs: {what} baked into the graph "
                                               "(default: the head's, as `clipfuse run`)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of random init with --pretrained none")
    parser.add_argument("--opset", type=opset, default=17, help="ONNX opset (default: %(default)s)")
    parser.add_argument("-o", "--output", required=True,
                        help="output path without suffix: writes OUTPUT.onnx and OUTPUT.json")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _block_list(text: str) -> tuple:
    try:
        blocks = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None
    if not blocks or min(blocks) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative block indices, got {text!r}")
    return blocks


def head_overrides(args: argparse.Namespace) -> dict:
    params = {}
    if args.attn is not None:
        params["attn"] = args.attn
    if args.gaussian_sigma is not None:
        params["gaussian_sigma"] = args.gaussian_sigma or None
    if args.residual is not None:
        params["residual"] = args.residual
    if args.ffn is not None:
        params["ffn"] = args.ffn
    if args.no_background_rule:
        params["background_rule"] = False
    if args.rcs_lambda is not None:
        params["lam"] = args.rcs_lambda
    if args.rcs_blocks is not None:
        params["attention_blocks"] = args.rcs_blocks
    return params


def run(args: argparse.Namespace) -> int:
    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.vocab import parse_classes, read_classes_file

    if args.classes is not None:
        vocabulary = parse_classes(args.classes, allow_duplicates=args.allow_duplicate_names)
    else:
        vocabulary = read_classes_file(args.classes_file, args.allow_duplicate_names)
    if args.opset < 17:
        raise ClipfuseError("--opset must be >= 17 (LayerNormalization maps to TensorRT's normalisation layer)")
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    frame = None
    if args.frame is not None:
        from clipfuse.export.frame_graph import parse_frame
        frame = parse_frame(args.frame)
    baked = {"logit_scale": args.logit_scale, "prob_thd": args.prob_thd, "area_thd": args.area_thd,
             "short_side": args.short_side, "stride": args.stride}
    baked = {k: v for k, v in baked.items() if v is not None}
    if frame is None and baked:
        raise ClipfuseError("--logit-scale/--prob-thd/--area-thd/--short-side/--stride are baked into "
                            "frame graphs only (add --frame WxH); window graphs take them at run time")

    spec = ImageExportSpec(method=args.head, model=args.model, pretrained=args.pretrained, classes=vocabulary,
                           size=args.size, templates=args.templates, vocab_mode=args.vocab,
                           heads_checkpoint=args.heads, head_params=head_overrides(args),
                           quick_gelu=args.quick_gelu, seed=args.seed, opset=args.opset,
                           allow_duplicates=args.allow_duplicate_names, frame=frame, frame_protocol=baked)
    export_image_graph(spec, args.output, quiet=args.quiet)
    return 0
