"""`clipfuse export-refer`: the two Global-Local CLIP graphs (+ manifests) for referring segmentation."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Optional

from clipfuse.runtime.cliargs import fraction, non_negative_int, opset, positive_int

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

PRECISIONS = ("fp32", "fp16")


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
    parser.add_argument("--opset", type=opset, default=17, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--no-text", action="store_true",
                        help="do not write OUTPUT-text.onnx (e.g. when it exists from `clipfuse export-text`)")
    parser.add_argument("-o", "--output", required=True,
                        help="output prefix: writes OUTPUT-global, OUTPUT-local and OUTPUT-text (.onnx + .json)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"clipfuse: {msg}", file=sys.stderr, flush=True)


def _manifest(kind: str, clip, module, pretrained_arg: str, normalization: str, opset: int,
              precision: str, onnx_name: str, refer: dict) -> dict:
    from clipfuse.runtime.manifest import io_spec, new_manifest

    from .refer_graphs import INPUT_SIZE, NORMALIZATIONS

    mean, std = NORMALIZATIONS[normalization]
    size = INPUT_SIZE
    g = module.grid
    embed_dim = int(module.proj.shape[1])
    if kind == "refer-global":
        inputs = [io_spec("image", "float32", [1, size, size, 3], "NHWC",
                          description="RGB on the 0..255 pixel scale: the 800-pixel short-side copy "
                                      "resized to 224x224 (bilinear, not rounded); normalised in the graph"),
                  io_spec("masks", "float32", ["masks", g[0], g[1]], "NHW",
                          description="soft mask per proposal at grid resolution (bilinear resize of 0/1 masks)")]
        outputs = [io_spec("features", "float32", ["masks", embed_dim], "NE",
                           description="f_G: ln_post(CLS) @ proj per mask, not normalised")]
    else:
        inputs = [io_spec("crops", "float32", ["crops", size, size, 3], "NHWC",
                          description="masked, box-cropped, resized crops on the 0..255 pixel scale; "
                                      "normalised in the graph")]
        outputs = [io_spec("features", "float32", ["crops", embed_dim], "NE",
                           description="f_L: ln_post(CLS) @ proj per crop, not normalised")]
    return new_manifest(
        kind,
        model=clip.model_name,
        pretrained=clip.pretrained_id,
        pretrained_source=pretrained_arg,
        seed=getattr(clip, "seed", 0),
        quick_gelu=clip.quick_gelu,
        embed_dim=embed_dim,
        input_size=[size, size],
        patch_size=size // g[0],
        grid=list(g),
        inputs=inputs,
        outputs=outputs,
        normalization={"name": normalization, "mean": list(mean), "std": list(std), "in_graph": True},
        refer=refer,
        opset=opset,
        precision=precision,
        onnx_file=onnx_name,
        onnx_sha256=None,
    )


def export_refer(out: "str | Path", model: str = "ViT-B-32", pretrained: str = "openai",
                 normalization: str = "imagenet", masked_blocks: int = 3, alpha: float = 0.95,
                 fill: str = "public", precision: str = "fp32", quick_gelu: Optional[bool] = None,
                 seed: int = 0, opset: int = 17, text: bool = True, quiet: bool = True) -> Dict[str, Path]:
    """Write OUT-global.onnx/.json and OUT-local.onnx/.json (+ OUT-text.onnx/.json, the text graph
    of clipfuse.export.text_graph, when `text`); returns {"global": p, "local": p[, "text": p]}."""
    from clipfuse.runtime.errors import ClipfuseError

    from .artifacts import graph_with_manifest
    from .refer_graphs import ReferGlobal, ReferLocal, export_onnx
    from .weights import load_clip

    if precision not in PRECISIONS:
        raise ClipfuseError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if opset < 17:
        raise ClipfuseError("--opset must be >= 17 (LayerNormalization maps to TensorRT's normalisation layer)")
    if not 0.0 <= alpha <= 1.0:
        raise ClipfuseError(f"--alpha must be in [0, 1], got {alpha}")
    out = Path(out)
    if out.suffix == ".onnx":
        out = out.with_suffix("")
    t0 = time.time()
    _log(f"loading {model} ({pretrained})", quiet)
    clip = load_clip(model, pretrained, quick_gelu=quick_gelu, seed=seed)
    visual = clip.model.visual
    from clipfuse.runtime.refer.pipeline import refer_section
    refer = refer_section(alpha, masked_blocks, fill)
    modules = {"global": ReferGlobal(visual, normalization, masked_blocks).eval(),
               "local": ReferLocal(visual, normalization).eval()}
    written: Dict[str, Path] = {}
    for part, module in modules.items():
        path = out.with_name(f"{out.name}-{part}.onnx")
        kind = f"refer-{part}"
        manifest = _manifest(kind, clip, module, pretrained, normalization, opset, precision, path.name, refer)
        _log(f"exporting {path.name} ({kind}, grid {module.grid[0]}x{module.grid[1]}, {precision})", quiet)
        with graph_with_manifest(path, manifest) as tmp_onnx:
            export_onnx(module, str(tmp_onnx), opset)
            if precision == "fp16":
                from .fp16 import convert_file
                manifest["fp16"] = convert_file(tmp_onnx, tmp_onnx).to_dict()
        written[part] = path
    if text:  # the same loaded weights, so the three graphs share one CLIP
        from .text_graph import export_text_graph
        written["text"] = export_text_graph(out.with_name(f"{out.name}-text"), clip=clip, opset=opset,
                                            precision=precision, quiet=quiet)
    _log(f"wrote {', '.join(p.name for p in written.values())} in {time.time() - t0:.1f} s", quiet)
    return written


def run(args: argparse.Namespace) -> int:
    qg = None if args.quick_gelu is None else args.quick_gelu == "on"
    export_refer(args.output, model=args.model, pretrained=args.pretrained, normalization=args.norm,
                 masked_blocks=args.masked_blocks, alpha=args.alpha, fill=args.fill, precision=args.precision,
                 quick_gelu=qg, seed=args.seed, opset=args.opset, text=not args.no_text, quiet=args.quiet)
    return 0
