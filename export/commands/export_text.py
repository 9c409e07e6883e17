"""`clipfuse export-text`: the CLIP text encoder as ONNX (+ manifest), for vocabularies chosen on the device."""
from __future__ import annotations

import argparse

from clipfuse.export.spec import OPSET
from clipfuse.runtime.cliargs import non_negative_int, on_off, opset

ORDER = 30  # place in `clipfuse --help`
HELP = "export the CLIP text encoder (tokens -> text features) as ONNX, FP32 or FP16, with its manifest"
DESCRIPTION = """\
Write open_clip's encode_text as an ONNX graph (opset 17) plus a JSON manifest beside it, so the
torch-free runtime can embed NEW class names on the device (pair it with an image graph exported
with --vocab dynamic, same --model/--pretrained/--seed).

graph I/O:  tokens int64 [batch, 77] (CLIP BPE ids from clipfuse.runtime.tokenizer)
            ->  text_features float32 [batch, E] (NOT L2-normalised; the runtime normalises,
                averages over the templates and normalises again)

examples:
  clipfuse export-text --model ViT-B-16 --pretrained openai -o engines/vitb16-text
  clipfuse export-text --model ViT-B-16 --pretrained ~/ckpt/ViT-B-16.pt --precision fp16 -o engines/vitb16-text-fp16
  clipfuse export-text --model ViT-T-16-test --pretrained none -o /tmp/smoke-text       # tiny, random

--precision fp16: FP16 weights and activations, with LayerNorm, Softmax and the final text
projection computed in FP32 (explicit Casts; build the engine strongly typed).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture name (default: %(default)s)")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip tag, a local checkpoint file (open_clip or OpenAI format), or 'none' "
                             "for random init; use what the image graph used (default: %(default)s)")
    parser.add_argument("-o", "--output", required=True,
                        help="output prefix: writes OUTPUT.onnx and OUTPUT.json (e.g. engines/vitb16-text)")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                        help="graph precision (default: %(default)s)")
    parser.add_argument("--quick-gelu", type=on_off, default=None, metavar="on|off",
                        help="activation of the weights: on = QuickGELU (OpenAI), off = GELU (LAION, DataComp). "
                             "Default: decided by the weights (tag, OpenAI-format file, *-quickgelu model); "
                             "required for open_clip-format files, which do not record it")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of random init with --pretrained none; the same seed as the image graph "
                             "gives the same CLIP (default: %(default)s)")
    parser.add_argument("--opset", type=opset, default=OPSET, help="ONNX opset, >= 17 (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    from clipfuse.export.text_graph import export_text_graph

    export_text_graph(args.output, model=args.model, pretrained=args.pretrained, quick_gelu=args.quick_gelu,
                      seed=args.seed, opset=args.opset, precision=args.precision, quiet=args.quiet)
    return 0
