"""`clipfuse run`: segment images with an exported graph or built engine (no PyTorch needed)."""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path
from typing import List, Tuple

HELP = "segment images (file, folder or glob) with an exported .onnx or built .engine"

DESCRIPTION = """\
Segment images with the method's own sliding-window protocol (defaults from the model's manifest):
short-side resize, windows with the edge rule, all windows of an image in one batched call,
averaging, resize to the image, then SCLIP-style post-processing (logit scale, prob_thd, area_thd)
or CLIP-DINOiser's probabilities.

Writes per image into OUT (folder inputs keep their sub-folders):
  NAME.labels.png    palette PNG, pixel value = class index (np.array(Image.open(...)))
  NAME.overlay.png   photo + class colours + legend (skip with --no-overlay)
  NAME.json          per-class pixel counts and shares

examples:
  clipfuse run engines/sclip.onnx photo.jpg -o out/
  clipfuse run engines/sclip.onnx photos/ -o out/ --backend ort-cuda --batch 8
  clipfuse run engines/sclip.engine "shots/*.jpg" -o out/ --logit-scale 65 --prob-thd 0.1 --area-thd 0.1
  clipfuse run engines/dinoiser.onnx big.jpg -o out/ --short-side 672
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="exported graph (.onnx) or built engine (.engine); its .json must sit beside it")
    parser.add_argument("inputs", nargs="+", help="image file(s), folder(s) (searched recursively) or glob pattern(s)")
    parser.add_argument("-o", "--out", required=True, help="output folder (created)")
    parser.add_argument("--text-model", default=None,
                        help="--vocab dynamic graphs: the text graph from `clipfuse export-text` that "
                             "embeds the class names on this machine")
    parser.add_argument("--classes", default=None,
                        help='--vocab dynamic graphs: new vocabulary, e.g. "sky,tree" or "bg;person,people" '
                             "(default: the manifest's classes)")
    parser.add_argument("--templates", default=None, choices=["imagenet80", "single"],
                        help="--vocab dynamic graphs: prompt templates (default: the manifest's)")
    parser.add_argument("--backend", default="auto",
                        help="auto (tensorrt for .engine, ort-cpu for .onnx), ort-cpu, ort-cuda, ort-trt, "
                             "tensorrt, openvino, torch (default: %(default)s)")
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                        help="openvino: compute precision (default auto: bf16 where the CPU has it and the "
                             "head keeps its labels, else fp32); recorded in each NAME.json")
    parser.add_argument("--device", default=None,
                        help="openvino: device as OpenVINO names it (CPU, GPU, GPU.1, NPU; default CPU)")
    proto = parser.add_argument_group("protocol overrides (default: the manifest's values)")
    proto.add_argument("--short-side", type=int, help="resize so the short side has this many pixels")
    proto.add_argument("--long-side-max", type=int, help="cap on the long side after resizing")
    proto.add_argument("--window-stride", type=int, help="sliding-window stride in pixels")
    proto.add_argument("--logit-scale", type=float, help="cosine heads: softmax temperature (SCLIP 40, VOC 65)")
    proto.add_argument("--prob-thd", type=float, help="cosine heads: pixels below this max probability -> class 0")
    proto.add_argument("--area-thd", type=float,
                       help="cosine heads: drop classes covering <= this fraction of the foreground")
    parser.add_argument("--batch", type=int, default=None,
                        help="windows per backend call (default: all windows of an image, capped by "
                             "the engine's max batch)")
    parser.add_argument("--threads", type=int, default=None, help="ort-cpu, openvino: CPU threads (default: all cores)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="refuse (or, for JPEG, decode reduced) images above this many pixels "
                             "(default: 89478485, Pillow's limit)")
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay PNG (faster)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the model file")


def collect_inputs(patterns: List[str]) -> List[Tuple[Path, Path]]:
    """(image path, output stem relative to OUT) for every input; folders keep their structure."""
    from .errors import ClipfuseError
    from .imageio import is_image_path

    found: List[Tuple[Path, Path]] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p))
            if not files:
                raise ClipfuseError(f"folder {path} holds no images ({', '.join(_suffixes())})")
            found += [(p, p.relative_to(path).with_suffix("")) for p in files]
        elif path.is_file():
            found.append((path, Path(path.stem)))
        elif glob.has_magic(pattern):
            files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not files:
                raise ClipfuseError(f"no file matches {pattern!r}")
            found += [(p, Path(p.stem)) for p in files]
        else:
            raise ClipfuseError(f"image not found: {pattern}")
    stems = {}
    for src, stem in found:
        if stem in stems and stems[stem] != src:
            raise ClipfuseError(f"{src} and {stems[stem]} would write the same outputs ({stem}); "
                                "run them separately or pass their folder")
        stems[stem] = src
    return found


def _suffixes() -> List[str]:
    from .imageio import IMAGE_SUFFIXES
    return list(IMAGE_SUFFIXES)


def _feed_vocabulary(seg, args: argparse.Namespace) -> None:
    """Embed the vocabulary with the exported text graph and hand it to the dynamic image graph."""
    from .errors import ClipfuseError
    from .text import TextEncoder, class_embeddings
    from .vocab import parse_classes

    if not args.text_model:
        raise ClipfuseError(f"{Path(args.model).name} takes its vocabulary at run time: pass --text-model "
                            "(made by `clipfuse export-text` with the same --model/--pretrained)")
    vocab = parse_classes(args.classes) if args.classes else seg.classes
    # the text graph is an .onnx too: openvino runs it as well (auto precision = fp32 for text)
    text_backend = "openvino" if args.backend == "openvino" else "auto"
    options = {"device": args.device} if args.device else {}
    encoder = TextEncoder.open(args.text_model, backend=text_backend, backend_options=options)
    for key in ("model", "pretrained"):
        if encoder.manifest.get(key) != seg.manifest.get(key):
            raise ClipfuseError(f"text graph {Path(args.text_model).name} has {key} {encoder.manifest.get(key)!r}, "
                                f"the image graph {seg.manifest.get(key)!r}: embeddings would not match")
    emb = class_embeddings(encoder, vocab, args.templates or seg.manifest.get("templates", "imagenet80"),
                           progress=True)
    seg.set_class_embeddings(emb.embeddings, emb.classes)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .errors import ClipfuseError
    from .imageio import DEFAULT_MAX_PIXELS, read_image
    from .outputs import save_label_png, save_overlay_png, save_shares_json
    from .segmenter import Segmenter

    if args.batch is not None and args.batch < 1:
        raise ClipfuseError(f"--batch must be >= 1, got {args.batch}")
    images = collect_inputs(args.inputs)
    options = {"threads": args.threads} if args.threads else {}
    if args.precision or args.device:
        if args.backend != "openvino":
            raise ClipfuseError("--precision/--device choose OpenVINO's compute precision and device: "
                                "use them with --backend openvino")
        options.update({k: v for k, v in (("precision", args.precision), ("device", args.device)) if v})
    seg = Segmenter.open(args.model, backend=args.backend, batch=args.batch, backend_options=options,
                         verify=not args.no_verify, short_side=args.short_side,
                         long_side_max=args.long_side_max, stride=args.window_stride,
                         logit_scale=args.logit_scale, prob_thd=args.prob_thd, area_thd=args.area_thd)
    if seg.dynamic_vocab:
        _feed_vocabulary(seg, args)
    elif args.text_model or args.classes:
        raise ClipfuseError(f"{Path(args.model).name} has a baked vocabulary; --text-model/--classes need a "
                            "graph exported with --vocab dynamic")
    out_dir = Path(args.out)
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    failures = []
    with seg, tqdm(images, desc="segmenting", unit="img", disable=len(images) < 2, file=sys.stderr) as bar:
        for src, stem in bar:
            try:
                image = read_image(src, max_pixels=max_pixels)
            except ClipfuseError as exc:
                if len(images) == 1:
                    raise
                failures.append(str(exc))
                tqdm.write(f"clipfuse run: skipped: {exc}", file=sys.stderr)
                continue
            result = seg.segment(image)
            base = out_dir / stem
            save_label_png(base.with_name(base.name + ".labels.png"), result.labels, len(result.class_names))
            if not args.no_overlay:
                save_overlay_png(base.with_name(base.name + ".overlay.png"), image, result.labels,
                                 result.class_names)
            save_shares_json(base.with_name(base.name + ".json"), result.labels, result.class_names,
                             source=str(src), extra={"model": str(args.model), "backend": seg.backend.name,
                                                     "precision": seg.backend.precision,
                                                     "windows": result.num_windows,
                                                     "processing_size": list(result.processing_size)})
    done = len(images) - len(failures)
    print(f"clipfuse run: {done} image(s) segmented into {out_dir}", file=sys.stderr)
    if failures:
        raise ClipfuseError(f"{len(failures)} of {len(images)} images could not be read "
                            f"(first: {failures[0]})")
    return 0
