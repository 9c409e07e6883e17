"""`clipfuse compare`: run two artifacts of one export on the same real image windows and compare
their outputs (max abs diff, argmax agreement, NaN/Inf) against stated tolerances."""
from __future__ import annotations

import argparse
import math
import glob
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..cliargs import positive_int
from ..manifest import Manifest

ORDER = 70  # place in `clipfuse --help`
HELP = "compare two of {PyTorch reference, ONNX FP32, ONNX FP16, TensorRT engine} on real images"
DESCRIPTION = """\
Run two artifacts of the SAME export on the sliding windows of real images (the exact uint8
windows `clipfuse run` feeds, from the method's protocol) and compare every output:
max abs diff, argmax agreement over the class axis, NaN/Inf. Exit code 0 when every output is
within tolerance, 1 on a miss, 2 on bad input.

Each side is ARTIFACT[@BACKEND]; BACKEND is any runtime backend (`clipfuse run --help` lists them;
default: tensorrt for .engine, ort-cpu for .onnx). The PyTorch reference is backend `torch` on the
FP32 graph (it rebuilds the model from the manifest and never reads the graph).

Default tolerances: max abs diff 1e-4 when both sides are FP32, 2e-2 when either is FP16 or a
TensorRT engine; argmax agreement >= 99 %; no NaN/Inf. A dynamic-vocabulary graph gets fixed
pseudo-random unit class embeddings (seed 0), the same for both sides.

examples:
  clipfuse compare engines/sclip.onnx@torch engines/sclip.onnx --images tests/data/street.jpg
  clipfuse compare engines/sclip.onnx engines/sclip.fp16.onnx --images photos/ --max-images 8
  clipfuse compare engines/sclip.onnx engines/sclip.rtx1.7-sm86-fp16-b1_4_16-1a2b3c4d.engine \\
      --images photos/ --atol scores=5e-2 --min-argmax 0.995
"""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="first artifact, ARTIFACT[@BACKEND] (the reference side)")
    parser.add_argument("b", metavar="B", help="second artifact, ARTIFACT[@BACKEND]")
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH",
                        help="image files, folders or glob patterns")
    parser.add_argument("--max-images", type=positive_int, default=4, help="use at most this many images (default: 4)")
    parser.add_argument("--atol", action="append", default=[], metavar="[OUTPUT=]VALUE",
                        help="max abs diff allowed (for one output with OUTPUT=VALUE); repeatable")
    parser.add_argument("--min-argmax", action="append", default=[], metavar="[OUTPUT=]FRACTION",
                        help="least fraction of positions whose class argmax agrees (default 0.99); repeatable")
    parser.add_argument("--allow-nonfinite", action="store_true", help="do not fail on NaN/Inf")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")


def parse_side(text: str) -> Tuple[Path, str]:
    from ..errors import ClipfuseError

    path, _, backend = text.rpartition("@") if "@" in text else (text, "", "auto")
    path = Path(path)
    if not path.is_file():
        raise ClipfuseError(f"artifact not found: {path}")
    return path, backend or "auto"


def _per_output(values: List[str], flag: str, low: float = 0.0, high: float = math.inf
                ) -> Tuple[Optional[float], Dict[str, float]]:
    """'[OUTPUT=]NUMBER' values -> (default, {output: value}); finite and within [low, high]
    (a NaN tolerance makes every comparison pass)."""
    from ..errors import ClipfuseError

    default, named = None, {}
    for v in values:
        name, _, num = v.rpartition("=")
        try:
            x = float(num)
        except ValueError:
            raise ClipfuseError(f"{flag} {v!r}: expected [OUTPUT=]NUMBER") from None
        if not math.isfinite(x) or not low <= x <= high:
            raise ClipfuseError(f"{flag} {v!r}: must be a finite number >= {low:g}"
                                + (f" and <= {high:g}" if math.isfinite(high) else ""))
        if name:
            named[name] = x
        else:
            default = x
    return default, named


def _check_output_names(named: Dict[str, float], flag: str, outputs: List[str]) -> None:
    """A tolerance for an output the graph does not have would be silently ignored."""
    from ..errors import ClipfuseError

    unknown = sorted(set(named) - set(outputs))
    if unknown:
        raise ClipfuseError(f"{flag} {unknown[0]}=...: the graph has no output {unknown[0]!r} "
                            f"(outputs: {', '.join(outputs)})")


def collect_images(patterns: List[str], limit: int) -> List[Path]:
    from ..errors import ClipfuseError

    found: List[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        elif glob.has_magic(pattern):
            found += sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
        else:
            raise ClipfuseError(f"image not found: {pattern}")
    if not found:
        raise ClipfuseError(f"no images in {' '.join(patterns)}")
    return found[:max(1, limit)]


def lineage(meta: Manifest) -> Optional[str]:
    """The FP32 export an artifact comes from (FP16 graphs and engines record their source)."""
    return meta.source_onnx_sha256 or meta.onnx_sha256


def is_reduced_precision(artifact: Path, meta: Manifest, backend: str) -> bool:
    return meta.is_fp16 or artifact.suffix == ".engine" or backend == "ort-trt"


def window_feeds(meta: Manifest, images: List[Path]) -> List[Dict[str, "object"]]:
    """One feed dict per image: all its protocol windows (uint8 [n, S, S, 3])."""
    import numpy as np

    from ..errors import ClipfuseError
    from ..imageio import read_image
    from ..protocol import extract_windows, processing_size, resize_image, window_boxes
    from ..manifest import ImageManifest
    from ..protocol import protocol_from_manifest

    if meta.kind != "image" or not isinstance(meta, ImageManifest) or [i.name for i in meta.inputs][:1] != ["image"]:
        raise ClipfuseError(f"compare runs image graphs (clipfuse export); this is a {meta.kind!r} artifact")
    protocol = protocol_from_manifest(meta)
    window = meta.window
    dynamic = meta.dynamic_vocab
    if dynamic:
        rows = sum(len(names) for names in meta.classes) or 1
        emb = np.random.default_rng(0).standard_normal((rows, int(meta.embed_dim or 0))).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    feeds = []
    for path in images:
        image = read_image(path)
        size = processing_size(image.shape[0], image.shape[1], protocol.short_side, protocol.long_side_max)
        resized = resize_image(image, size)
        feed = {"image": extract_windows(resized, window_boxes(size[0], size[1], window, protocol.stride), window)}
        if dynamic:
            feed["class_embeddings"] = emb
        feeds.append(feed)
    return feeds


def run_side(backend, feeds) -> Dict[str, "object"]:
    """All outputs of one backend over all feeds, in chunks of its max batch."""
    from ..backends.base import run_in_chunks
    from ..compare import merge

    return merge([run_in_chunks(backend, feed, "image") for feed in feeds])


def run(args: argparse.Namespace) -> int:
    from ..backends import open_backend
    from ..compare import Tolerance, compare_outputs, format_table
    from ..errors import ClipfuseError
    from ..artifact import open_artifact

    sides = [parse_side(args.a), parse_side(args.b)]
    opened = [open_artifact(path) for path, _ in sides]
    manifests = [art.meta for art in opened]
    if lineage(manifests[0]) != lineage(manifests[1]):
        raise ClipfuseError(f"{sides[0][0].name} and {sides[1][0].name} come from different exports "
                            "(source ONNX hashes differ): compare artifacts of one export")
    atol, atol_named = _per_output(args.atol, "--atol")
    argmax, argmax_named = _per_output(args.min_argmax, "--min-argmax", high=1.0)
    output_names = [t.name for t in manifests[0].outputs]
    _check_output_names(atol_named, "--atol", output_names)
    _check_output_names(argmax_named, "--min-argmax", output_names)
    reduced = any(is_reduced_precision(p, m, b) for (p, b), m in zip(sides, manifests))
    default_tol = Tolerance(max_abs=atol if atol is not None else (2e-2 if reduced else 1e-4),
                            min_argmax=argmax if argmax is not None else 0.99,
                            allow_nonfinite=args.allow_nonfinite)
    tolerances = {name: Tolerance(max_abs=atol_named.get(name, default_tol.max_abs),
                                  min_argmax=argmax_named.get(name, default_tol.min_argmax),
                                  allow_nonfinite=args.allow_nonfinite)
                  for name in set(atol_named) | set(argmax_named)}

    images = collect_images(args.images, args.max_images)
    feeds = window_feeds(manifests[0], images)
    outputs = []
    for (path, backend_name), art in zip(sides, opened):
        with open_backend(path, art.manifest, backend_name) as backend:
            print(f"running {path.name} on {backend.name} ({sum(len(f['image']) for f in feeds)} windows of "
                  f"{len(images)} image(s)) ...", file=sys.stderr)
            outputs.append(run_side(backend, feeds))
    results = compare_outputs(outputs[0], outputs[1], tolerances, default_tol)
    failed = [r for r in results if not r.passed]
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "images": [str(p) for p in images],
                          "tolerance": default_tol.__dict__, "outputs": [r.to_dict() for r in results],
                          "passed": not failed}, indent=2))
    else:
        print(f"A: {args.a}\nB: {args.b}\n{format_table(results)}")
    if failed:
        print(f"clipfuse compare: {len(failed)} of {len(results)} output(s) outside tolerance", file=sys.stderr)
        return 1
    return 0
