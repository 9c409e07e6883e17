"""`clipfuse export-refer`: the two Global-Local CLIP graphs (+ manifests) for referring segmentation."""
from __future__ import annotations

import argparse

from clipfuse.export.spec import OPSET
from clipfuse.runtime.cliargs import fraction, non_negative_int, opset, positive_int

from ..refer_export import PRECISIONS

ORDER = 100  # place in `clipfuse --help`
HELP = "export the Global-Local CLIP referring-segmentation graphs (global + local) with manifests"
DESCRIPTION = """\
Export the visual half of Global-Local CLIP (zero-shot referring segmentation, CVPR 2023) as two
ONNX graphs (opset 17) over an unmodified open_clip ViT, with a JSON manifest beside each:

  OUTPUT-global.onnx  image float32 [1, 224, 224, 3] NHWC, 0..255 pixel scale (the public code's
                      224 resize of its 800-pixel copy, not rounded) + masks float32 [N, g, g] (soft, grid
                      resolution: g = 7 for ViT-B/32, 14 for ViT-B/16)  ->  features float32 [N, E]
                      (blocks 0..L-4 once; patch tokens x mask before each of the last 3 blocks)
  OUTPUT-local.onnx   crops float32 [N, 224, 224, 3] NHWC, 0..255 pixel scale (masked, box-cropped,
                      resized by the runtime)  ->  features float32 [N, E]
Features are raw (not normalised): the runtime mixes f = alpha*f_G + (1-alpha)*f_L before the cosine.
Normalisation is in the graphs; the public code uses the ImageNet mean/std (default), --norm clip
switches to CLIP's. The text side is the ordinary text graph (`clipfuse export-text`), written
from the same weights as OUTPUT-text.onnx (skip with --no-text).

examples:
  clipfuse export-refer --model ViT-B-32 --pretrained openai -o engines/refer-b32
  clipfuse export-refer --model ViT-B-16 --pretrained ~/ckpt/ViT-B-16.pt --precision fp16 -o engines/refer-b16
  clipfuse export-refer --model ViT-B-32 --pretrained ~/ckpt/b32-openai.bin --quick-gelu on -o engines/refer-b32
      (an open_clip-format file does not say whether it needs QuickGELU: OpenAI weights do)
  clipfuse export-refer --model ViT-B-32 --pretrained none -o /tmp/refer-smoke     # random weights
then:
  clipfuse refer photo.jpg "the cat lying on the scooter seat" --graphs engines/refer-b32 -o out/
"""



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B-32",
                        help="open_clip ViT architecture (the paper: ViT-B-32) (default: %(default)s)")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip tag, local checkpoint file, or 'none' for random init "
                             "(default: %(default)s)")
    parser.add_argument("--norm", choices=["imagenet", "clip"], default="imagenet",
                        help="in-graph pixel normalisation; the public code uses ImageNet's "
                             "(default: %(default)s)")
    parser.add_argument("--masked-blocks", type=positive_int, default=3,
                        help="token masking before each of the last K blocks (default: %(default)s)")
    parser.add_argument("--alpha", type=fraction, default=0.95,
                        help="default global/local mix recorded in the manifest: 0.95 RefCOCO/RefCOCO+, "
                             "0.85 RefCOCOg (default: %(default)s)")
    parser.add_argument("--fill", choices=["public", "mean"], default="public",
                        help="colour outside the mask in local crops: 'public' = the constant "
                             "(0.485,0.456,0.406) in normalised space as the public code; 'mean' = the "
                             "mean colour (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp16: FP16 graphs with FP32 islands (clipfuse.export.fp16) (default: %(default)s)")
    parser.add_argument("--quick-gelu", choices=["on", "off"], default=None,
                        help="activation of the weights: on = QuickGELU (OpenAI), off = GELU (LAION, DataComp). "
                             "Default: decided by the weights (tag, OpenAI-format file, *-quickgelu model); "
                             "required for open_clip-format files, which do not record it")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of random init with --pretrained none")
    parser.add_argument("--opset", type=opset, default=OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--no-text", action="store_true",
                        help="do not write OUTPUT-text.onnx (e.g. when it exists from `clipfuse export-text`)")
    parser.add_argument("-o", "--output", required=True,
                        help="output prefix: writes OUTPUT-global, OUTPUT-local and OUTPUT-text (.onnx + .json)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from ..refer_export import export_refer

    qg = None if args.quick_gelu is None else args.quick_gelu == "on"
    export_refer(args.output, model=args.model, pretrained=args.pretrained, normalization=args.norm,
                 masked_blocks=args.masked_blocks, alpha=args.alpha, fill=args.fill, precision=args.precision,
                 quick_gelu=qg, seed=args.seed, opset=args.opset, text=not args.no_text, quiet=args.quiet)
    return 0
