"""Segment many image files into a folder (the library behind `clipfuse run`): the vocabulary of a
dynamic graph embedded with the text graph, then one label map / overlay / JSON set per image."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import ClipfuseError


def feed_vocabulary(seg, text_model: Optional[str], classes: Optional[str], templates: Optional[str],
                    backend: str = "auto", device: Optional[str] = None) -> None:
    """Embed `classes` (default: the graph's own) with the exported text graph and hand the rows
    to the dynamic-vocabulary image graph `seg`."""
    from .text import TextEncoder, class_embeddings
    from .vocab import parse_classes

    # --classes "" is a mistake, not "the manifest's classes" (export refuses it too)
    vocab = parse_classes(classes, allow_duplicates=None) if classes is not None else seg.classes
    if not text_model:
        raise ClipfuseError(f"{Path(seg.artifact).name} takes its vocabulary at run time: pass --text-model "
                            "(made by `clipfuse export-text` with the same --model/--pretrained)")
    # the text graph is an .onnx too: openvino runs it as well (auto precision = fp32 for text)
    text_backend = "openvino" if backend == "openvino" else "auto"
    options = {"device": device} if device else {}
    encoder = TextEncoder.open(text_model, backend=text_backend, backend_options=options)
    for key in ("model", "pretrained"):
        if getattr(encoder.meta, key) != getattr(seg.meta, key):
            raise ClipfuseError(f"text graph {Path(text_model).name} has {key} {getattr(encoder.meta, key)!r}, "
                                f"the image graph {getattr(seg.meta, key)!r}: embeddings would not match")
    emb = class_embeddings(encoder, vocab, templates or seg.meta.templates or "imagenet80", progress=True)
    seg.set_class_embeddings(emb.embeddings, emb.classes)


def segment_files(seg, images: Sequence[Tuple[Path, str]], out_dir: Path, *, overlay: bool = True,
                  max_pixels: Optional[int] = None, extra: Optional[Dict[str, object]] = None,
                  skipped: Callable[[str], None] = lambda message: None) -> List[str]:
    """Segment each (source, output stem) with `seg` and write its outputs under `out_dir`.
    An unreadable image among several is skipped (`skipped(message)`); a single one raises.
    Returns the skip messages."""
    from tqdm import tqdm

    from .imageio import DEFAULT_MAX_PIXELS, read_image
    from .outputs import write_image_outputs

    failures: List[str] = []
    with tqdm(images, desc="segmenting", unit="img", disable=len(images) < 2, file=sys.stderr) as bar:
        for src, stem in bar:
            try:
                image = read_image(src, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
            except ClipfuseError as exc:
                if len(images) == 1:
                    raise
                failures.append(str(exc))
                skipped(str(exc))
                continue
            result = seg.segment(image)
            write_image_outputs(out_dir / stem, image, result.labels, result.class_names, overlay=overlay,
                                source=str(src),
                                extra={**(extra or {}), "backend": seg.backend.name,
                                       "precision": seg.backend.precision, "windows": result.num_windows,
                                       "processing_size": list(result.processing_size)})
    return failures
