"""`clipfuse export`: one fused ONNX graph (+ manifest) per head, model, vocabulary and size."""
from __future__ import annotations

import argparse

from clipfuse.export.spec import DYNAMO_MIN_OPSET, EXPORTERS, OPSET
from clipfuse.runtime.cliargs import fraction, int_range, logit_scale, non_negative_int, on_off, opset, pixels

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
    from clipfuse.export.head_args import add_head_arguments
    add_head_arguments(parser)           # --attn, --gaussian-sigma, ...: from the parameter dataclasses
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of random init with --pretrained none")
    parser.add_argument("--opset", type=opset, default=None,
                        help=f"ONNX opset (default: {OPSET}; {DYNAMO_MIN_OPSET} with --exporter dynamo)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="legacy",
                        help="torch.onnx exporter: legacy (TorchScript, default) or dynamo (torch.export + "
                             "onnxscript: writes the weights without in-memory copies; ViT-L/14 export peak "
                             "5.3 -> 3.1 GiB; needs onnxscript; window graphs only)")
    parser.add_argument("-o", "--output", required=True,
                        help="output path without suffix: writes OUTPUT.onnx and OUTPUT.json")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.vocab import parse_classes, read_classes_file

    if args.classes is not None:
        vocabulary = parse_classes(args.classes, allow_duplicates=args.allow_duplicate_names)
    else:
        vocabulary = read_classes_file(args.classes_file, args.allow_duplicate_names)
    if args.opset is None:
        args.opset = DYNAMO_MIN_OPSET if args.exporter == "dynamo" else OPSET
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    from clipfuse.export.head_args import head_overrides
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
                           allow_duplicates=args.allow_duplicate_names, frame=frame, frame_protocol=baked,
                           exporter=args.exporter)
    export_image_graph(spec, args.output, quiet=args.quiet)
    return 0
