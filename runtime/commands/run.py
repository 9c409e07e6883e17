"""`clipfuse run`: segment images with an exported graph or built engine (no PyTorch needed)."""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path
from typing import List, Tuple

from ..cliargs import fraction, int_range, logit_scale, pixels

# Option ranges: beyond them a value is a typo or an attack on memory, not a setting.
SIDE = pixels
LOGIT_SCALE = logit_scale
BATCH = int_range(1, 4096)
THREADS = int_range(1, 1024)
MAX_PIXELS = int_range(1, 1 << 31)

ORDER = 60  # place in `clipfuse --help`
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
NAME is the file name without suffix ('_' in front of one starting with '.', so nothing lands
outside OUT); the three files of an image are written together or not at all. OUT is checked to
be writable before the model is opened. Folders and globs skip *.labels.png and *.overlay.png
(clipfuse's own outputs), so OUT may be the input folder.

examples:
  clipfuse run engines/sclip.onnx photo.jpg -o out/
  clipfuse run engines/sclip.onnx photos/ -o out/ --backend ort-cuda --batch 8
  clipfuse run engines/sclip.engine "shots/*.jpg" -o out/ --logit-scale 65 --prob-thd 0.1 --area-thd 0.1
  clipfuse run engines/dinoiser.onnx big.jpg -o out/ --short-side 672
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..backends.base import backend_help

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
                        help=backend_help())
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                        help="openvino: compute precision (default auto: bf16 where the CPU has it and the "
                             "head keeps its labels, else fp32); recorded in each NAME.json")
    parser.add_argument("--device", default=None,
                        help="openvino: device as OpenVINO names it (CPU, GPU, GPU.1, NPU; default CPU)")
    proto = parser.add_argument_group("protocol overrides (default: the manifest's values)")
    proto.add_argument("--short-side", type=SIDE, help="resize so the short side has this many pixels (1-16384)")
    proto.add_argument("--long-side-max", type=SIDE, help="cap on the long side after resizing (1-16384)")
    proto.add_argument("--window-stride", type=SIDE, help="sliding-window stride in pixels (1 to the window size)")
    proto.add_argument("--logit-scale", type=LOGIT_SCALE,
                       help="cosine heads: softmax temperature, > 0 and <= 1000 (SCLIP 40, VOC 65)")
    proto.add_argument("--prob-thd", type=fraction,
                       help="cosine heads: pixels below this max probability -> class 0 (0-1)")
    proto.add_argument("--area-thd", type=fraction,
                       help="cosine heads: drop classes covering <= this fraction of the foreground (0-1)")
    parser.add_argument("--batch", type=BATCH, default=None,
                        help="windows per backend call (default: all windows of an image, capped by "
                             "the engine's max batch)")
    parser.add_argument("--threads", type=THREADS, default=None, help="ort-cpu, openvino: CPU threads (default: all cores)")
    parser.add_argument("--max-pixels", type=MAX_PIXELS, default=None,
                        help="refuse (or, for JPEG, decode reduced) images above this many pixels "
                             "(default: 89478485, Pillow's limit)")
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay PNG (faster)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the model file")


def safe_part(name: str) -> str:
    """One component of an output name that stays inside OUT: names starting with a dot ('.',
    '..', '.hidden', the stems of '..jpg' or '...jpg') get a '_' in front."""
    return "_" + name if name.startswith(".") or not name else name


def output_stem(relative: Path) -> Path:
    """Output stem (relative to OUT) of an input at `relative` (below its folder, or its name)."""
    parts = list(relative.parts[:-1]) + [Path(relative.name).stem]
    return Path(*[safe_part(part) for part in parts])


def _is_own_output(path: Path) -> bool:
    from ..outputs import OUTPUT_SUFFIXES
    return path.name.lower().endswith(OUTPUT_SUFFIXES)


def collect_inputs(patterns: List[str]) -> List[Tuple[Path, Path]]:
    """(image path, output stem relative to OUT) for every input; folders keep their structure.

    Folders and globs skip clipfuse's own outputs (*.labels.png, *.overlay.png), so `run DIR -o DIR`
    twice does not segment the label maps; a file named explicitly is always taken.
    """
    from ..errors import ClipfuseError
    from ..imageio import is_image_path

    found: List[Tuple[Path, Path]] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and is_image_path(p) and not _is_own_output(p))
            if not files:
                raise ClipfuseError(f"folder {path} holds no images ({', '.join(_suffixes())})")
            found += [(p, output_stem(p.relative_to(path))) for p in files]
        elif path.is_file():
            found.append((path, output_stem(Path(path.name))))
        elif glob.has_magic(pattern):
            files = sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                           if Path(p).is_file() and not _is_own_output(Path(p)))
            if not files:
                raise ClipfuseError(f"no file matches {pattern!r}")
            found += [(p, output_stem(Path(p.name))) for p in files]
        else:
            raise ClipfuseError(f"image not found: {pattern}")
    stems = {}
    for src, stem in found:
        if stem in stems and stems[stem] != src:
            raise ClipfuseError(f"{src} and {stems[stem]} would write the same outputs ({stem}); "
                                "run them separately or pass their folder")
        stems[stem] = src
    return found


def check_output_plan(images: List[Tuple[Path, Path]], out_dir: Path, overlay: bool) -> None:
    """Refuse, before any inference, outputs that would leave OUT or replace something that is not
    an output of ours: a clipfuse manifest (e.g. -o engines/ with an image named like a model),
    one of the input images, or a folder."""
    import json

    from ..errors import ClipfuseError
    from ..manifest import FORMAT
    from ..outputs import output_paths

    root = out_dir.resolve()
    inputs = {src.resolve() for src, _ in images}
    for src, stem in images:
        for target in output_paths(out_dir / stem, overlay):
            if root not in target.resolve().parents:
                raise ClipfuseError(f"outputs of {src} would be written outside {out_dir} ({target})")
            if target.resolve() in inputs:
                raise ClipfuseError(f"outputs of {src} would overwrite the input {target}")
            if target.is_dir():
                raise ClipfuseError(f"outputs of {src}: {target} is a folder")
            if target.suffix == ".json" and target.is_file():
                try:
                    is_manifest = json.loads(target.read_text(encoding="utf-8")).get("format") == FORMAT
                except (OSError, ValueError, AttributeError):
                    is_manifest = False
                if is_manifest:
                    raise ClipfuseError(f"outputs of {src} would overwrite the model manifest {target}; "
                                        "choose another -o folder")


def _suffixes() -> List[str]:
    from ..imageio import IMAGE_SUFFIXES
    return list(IMAGE_SUFFIXES)


def run(args: argparse.Namespace) -> int:
    from ..errors import ClipfuseError
    from ..fileio import writable_dir

    images = collect_inputs(args.inputs)
    options = {"threads": args.threads} if args.threads else {}
    if args.precision or args.device:
        if args.backend != "openvino":
            raise ClipfuseError("--precision/--device choose OpenVINO's compute precision and device: "
                                "use them with --backend openvino")
        options.update({k: v for k, v in (("precision", args.precision), ("device", args.device)) if v})
    with writable_dir(args.out, "-o folder") as out_dir:  # before the model is even opened
        check_output_plan(images, out_dir, overlay=not args.no_overlay)
        return _segment_all(args, images, out_dir, options)


def _segment_all(args: argparse.Namespace, images: list, out_dir: Path, options: dict) -> int:
    from tqdm import tqdm

    from ..batch import feed_vocabulary, segment_files
    from ..errors import ClipfuseError
    from ..segmenter import Segmenter

    seg = Segmenter.open(args.model, backend=args.backend, batch=args.batch, backend_options=options,
                         verify=not args.no_verify, short_side=args.short_side,
                         long_side_max=args.long_side_max, stride=args.window_stride,
                         logit_scale=args.logit_scale, prob_thd=args.prob_thd, area_thd=args.area_thd)
    if seg.dynamic_vocab:
        feed_vocabulary(seg, args.text_model, args.classes, args.templates, args.backend, args.device)
    elif args.text_model or args.classes is not None:
        raise ClipfuseError(f"{Path(args.model).name} has a baked vocabulary; --text-model/--classes need a "
                            "graph exported with --vocab dynamic")
    with seg:
        failures = segment_files(seg, images, out_dir, overlay=not args.no_overlay, max_pixels=args.max_pixels,
                                 extra={"model": str(args.model)},
                                 skipped=lambda message: tqdm.write(f"clipfuse run: skipped: {message}",
                                                                    file=sys.stderr))
    done = len(images) - len(failures)
    print(f"clipfuse run: {done} image(s) segmented into {out_dir}", file=sys.stderr)
    if failures:
        raise ClipfuseError(f"{len(failures)} of {len(images)} images could not be read "
                            f"(first: {failures[0]})")
    return 0
