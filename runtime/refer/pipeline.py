"""Global-Local CLIP on exported graphs: numpy pre-processing, the three encoders, mask ranking.

For one image, N binary mask proposals at the image's resolution and a sentence:
  global: image resized to 224x224 (uint8) + masks resized to the ViT grid bilinearly as floats
          (soft values) -> refer-global graph -> f_G [N, E]
  local:  per mask, image * m + (1 - m) * fill, cropped to the mask's box, resized to 224x224
          -> refer-local graph -> f_L [N, E]
  text:   t = 0.5 * enc(sentence) + 0.5 * enc(noun phrase), raw features, no templates
  f = alpha * f_G + (1 - alpha) * f_L (raw); score = cos(f, t); the answer is the best mask.

Parity notes (the public code's behaviour, and where this differs):
- The fill is the constant (0.485, 0.456, 0.406) in the NORMALISED space (fill="public"), i.e. a
  light grey after un-normalising; fill="mean" uses the mean colour (0 after normalisation).
- The box is FreeSOLO's: centre of mass and extent of the mask's row/column projections,
  truncated to int; crop and resize as torchvision's resized_crop (bilinear, no antialias).
- The public code resizes masks and crops with torchvision's tensor resize (bilinear, no antialias
  in the versions it ran on) and reaches 224x224 through an intermediate 800-pixel copy; here the
  image goes straight to 224x224 (bilinear, no antialias, as clipfuse.runtime.protocol).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ClipfuseError
from ..protocol import linear_taps, resize_image_float as resize_image
from .nounphrase import NounPhrase, extract_noun_phrase

# The public code's fill, a constant in the normalised space (see module docstring).
PUBLIC_FILL = (0.485, 0.456, 0.406)
FILL_MODES = ("public", "mean")
DEFAULT_ALPHA = 0.95                      # RefCOCO / RefCOCO+; RefCOCOg uses 0.85
DATASET_ALPHA = {"refcoco": 0.95, "refcoco+": 0.95, "refcocog": 0.85}
TEXT_WEIGHT = 0.5                         # t = 0.5 * sentence + 0.5 * noun phrase

EncodeText = Callable[[Sequence[str]], np.ndarray]    # texts -> raw features [N, E]


# ---------------------------------------------------------------------------------------------
# Pre-processing
# ---------------------------------------------------------------------------------------------
def resize_bilinear(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize axes 0 and 1 of a float array to `size` (h, w): bilinear, align_corners=False, no
    antialias (torch F.interpolate / torchvision tensor resize of the public code's era)."""
    x = np.asarray(x, dtype=np.float32)
    for axis, out in ((0, size[0]), (1, size[1])):
        if x.shape[axis] == out:
            continue
        i0, i1, w0, w1 = linear_taps(x.shape[axis], out)
        shape = [1] * x.ndim
        shape[axis] = out
        x = np.take(x, i0, axis=axis) * w0.astype(np.float32).reshape(shape) \
            + np.take(x, i1, axis=axis) * w1.astype(np.float32).reshape(shape)
    return x


def grid_masks(masks: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
    """Binary masks [N, H, W] -> soft masks [N, g, g] float32 (bilinear of the 0/1 values)."""
    m = np.moveaxis(np.asarray(masks, dtype=np.float32), 0, -1)      # [H, W, N]
    return np.ascontiguousarray(np.moveaxis(resize_bilinear(m, grid), -1, 0))


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """FreeSOLO's box per mask, as the public code uses it: the row/column projections' centre of
    mass +- half their extent, truncated toward zero -> int [N, 4] (x1, y1, x2, y2)."""
    masks = np.asarray(masks, dtype=bool)
    cols = masks.any(axis=1).astype(np.float64)          # [N, W] width projection
    rows = masks.any(axis=2).astype(np.float64)          # [N, H] height projection
    width, height = cols.sum(1), rows.sum(1)
    if (width == 0).any():
        raise ClipfuseError("an empty mask has no box; drop empty masks first")
    cx = (cols * np.arange(cols.shape[1])).sum(1) / width
    cy = (rows * np.arange(rows.shape[1])).sum(1) / height
    box = np.stack([cx - 0.5 * width, cy - 0.5 * height, cx + 0.5 * width, cy + 0.5 * height], 1)
    return np.trunc(box).astype(np.int64)


def fill_pixel(mean: Sequence[float], std: Sequence[float], fill: str = "public") -> np.ndarray:
    """The fill colour on the 0..255 pixel scale that the graph's normalisation maps to the
    public code's normalised fill (or to 0 for fill="mean")."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if fill == "public":
        return (np.asarray(PUBLIC_FILL, np.float32) * std + mean) * 255.0
    if fill == "mean":
        return mean * 255.0
    raise ClipfuseError(f"unknown fill {fill!r}; choose one of: {', '.join(FILL_MODES)}")


def local_crops(image: np.ndarray, masks: np.ndarray, mean: Sequence[float], std: Sequence[float],
                fill: str = "public", size: int = 224) -> np.ndarray:
    """Masked, box-cropped, resized crops -> float32 [N, size, size, 3] on the 0..255 scale.
    (The box never leaves the image: a projection's centre -+ half its count stays within
    [-0.5, W - 0.5], which truncates into [0, W].)"""
    image = np.asarray(image, dtype=np.float32)
    fill_px = fill_pixel(mean, std, fill)
    out = np.empty((len(masks), size, size, 3), dtype=np.float32)
    for n, (mask, (x1, y1, x2, y2)) in enumerate(zip(masks, mask_boxes(masks))):
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)        # a mask in column 0 alone still gets one
        m = mask[y1:y2, x1:x2, None].astype(np.float32)
        crop = image[y1:y2, x1:x2] * m + (1.0 - m) * fill_px
        out[n] = resize_bilinear(crop, (size, size))
    return out


def global_image(image: np.ndarray, size: int = 224) -> np.ndarray:
    """H x W x 3 uint8 -> [1, size, size, 3] uint8 (bilinear, no antialias)."""
    return resize_image(np.asarray(image, dtype=np.uint8), (size, size))[None]


# ---------------------------------------------------------------------------------------------
# Features and scores
# ---------------------------------------------------------------------------------------------
def combine_features(f_global: np.ndarray, f_local: np.ndarray, alpha: float) -> np.ndarray:
    return alpha * f_global + (1.0 - alpha) * f_local


def cosine_scores(features: np.ndarray, text: np.ndarray) -> np.ndarray:
    """cos(features[n], text) -> [N]."""
    f = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    t = text / max(float(np.linalg.norm(text)), 1e-12)
    return f @ t


def text_feature(encode: EncodeText, phrase: NounPhrase) -> np.ndarray:
    """t = 0.5 * enc(sentence) + 0.5 * enc(noun phrase), raw features -> [E]."""
    feats = np.asarray(encode([phrase.sentence, phrase.phrase]), dtype=np.float32)
    return TEXT_WEIGHT * feats[0] + (1.0 - TEXT_WEIGHT) * feats[1]


# ---------------------------------------------------------------------------------------------
# Graphs
# ---------------------------------------------------------------------------------------------
def _open(path: Path, kind: str, backend: str, options: Optional[dict]):
    from ..backends.base import open_backend
    from ..manifest import manifest_path_for, read_manifest

    if not path.is_file():
        raise ClipfuseError(f"graph not found: {path} (run `clipfuse export-refer` first)")
    manifest = read_manifest(manifest_path_for(path))
    if manifest.get("kind") != kind:
        raise ClipfuseError(f"{path.name} is a {manifest.get('kind')!r} artifact, expected {kind!r}")
    return open_backend(path, manifest, backend, **(options or {})), manifest


def _run_chunked(runner, feeds: Dict[str, np.ndarray], batched: str, output: str) -> np.ndarray:
    """Run with the `batched` input cut to the backend's max batch (engine profiles)."""
    total = len(feeds[batched])
    step = runner.max_batch or total
    outs = []
    for start in range(0, total, step):
        part = dict(feeds)
        part[batched] = feeds[batched][start:start + step]
        outs.append(runner.run(part)[output])
    return np.concatenate(outs, axis=0)


def graph_paths(prefix: "str | Path") -> Dict[str, Path]:
    """engines/NAME -> engines/NAME-global.onnx, -local.onnx, -text.onnx (.engine if present)."""
    prefix = Path(prefix)
    out = {}
    for part in ("global", "local", "text"):
        onnx_path = prefix.with_name(f"{prefix.name}-{part}.onnx")
        engine = prefix.with_name(f"{prefix.name}-{part}.engine")
        out[part] = engine if engine.exists() else onnx_path
    return out


def same_weights(a: dict, b: dict) -> bool:
    """Whether two manifests were exported from one CLIP (random weights: also the same seed)."""
    if (a.get("model"), a.get("pretrained")) != (b.get("model"), b.get("pretrained")):
        return False
    return a.get("pretrained") != "none" or a.get("seed") == b.get("seed")


@dataclass
class ReferResult:
    scores: np.ndarray                 # [N] cos(f, t), one per proposal
    best: int                          # index of the best proposal
    noun_phrase: NounPhrase
    alpha: float
    extra: dict = field(default_factory=dict)

    def ranking(self) -> List[int]:
        return [int(i) for i in np.argsort(-self.scores, kind="stable")]


class ReferSegmenter:
    """The refer-global and refer-local graphs (+ a text encoder) of one `export-refer` run."""

    def __init__(self, global_path: "str | Path", local_path: "str | Path",
                 encode_text: Optional[EncodeText] = None, backend: str = "auto",
                 backend_options: Optional[dict] = None) -> None:
        self.global_runner, self.global_manifest = _open(Path(global_path), "refer-global", backend,
                                                         backend_options)
        self.local_runner, self.local_manifest = _open(Path(local_path), "refer-local", backend,
                                                       backend_options)
        gm, lm = self.global_manifest, self.local_manifest
        if not same_weights(gm, lm):
            raise ClipfuseError(f"{Path(global_path).name} and {Path(local_path).name} come from different "
                                "weights; export them together with `clipfuse export-refer`")
        self.grid = tuple(gm["grid"])
        self.input_size = int(gm["input_size"][0])
        self.local_size = int(lm["input_size"][0])
        self.mean, self.std = gm["normalization"]["mean"], gm["normalization"]["std"]
        self.default_alpha = float(gm.get("refer", {}).get("alpha", DEFAULT_ALPHA))
        self.fill = lm.get("refer", {}).get("fill", "public")
        self.encode_text = encode_text
        self._closers = [self.global_runner, self.local_runner]

    @classmethod
    def open(cls, prefix: "str | Path", backend: str = "auto", text: Optional["str | Path"] = None,
             backend_options: Optional[dict] = None) -> "ReferSegmenter":
        """Open engines/NAME-{global,local}.onnx and the text graph (NAME-text.onnx or `text`)."""
        paths = graph_paths(prefix)
        text_path = Path(text) if text else paths["text"]
        if not text_path.is_file():
            raise ClipfuseError(f"text graph not found: {text_path}; export it with `clipfuse export-text "
                                f"--model M --pretrained P -o {Path(prefix)}-text` (same weights) or pass --text-graph")
        from ..text import TextEncoder
        encoder = TextEncoder.open(text_path, backend, backend_options=backend_options)
        try:
            seg = cls(paths["global"], paths["local"], encoder.encode, backend, backend_options)
        except BaseException:
            encoder.close()
            raise
        if not same_weights(encoder.manifest, seg.global_manifest):
            seg.close()
            encoder.close()
            raise ClipfuseError(f"{text_path.name} was exported from other weights than the refer graphs; "
                                "export both from the same --model/--pretrained/--seed")
        seg._closers.append(encoder)
        return seg

    # -- features ---------------------------------------------------------------------------------
    def global_features(self, image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        feeds = {"image": global_image(image, self.input_size), "masks": grid_masks(masks, self.grid)}
        return _run_chunked(self.global_runner, feeds, "masks", "features")

    def local_features(self, image: np.ndarray, masks: np.ndarray, fill: Optional[str] = None) -> np.ndarray:
        crops = local_crops(image, masks, self.mean, self.std, fill or self.fill, self.local_size)
        return _run_chunked(self.local_runner, {"crops": crops}, "crops", "features")

    def visual_features(self, image: np.ndarray, masks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(f_G, f_L) for proposals `masks` (bool [N, H, W] at the image's resolution)."""
        from .masks import check_proposals
        checked, kept = check_proposals(masks, np.asarray(image).shape[:2])
        if len(kept) != len(masks):
            raise ClipfuseError(f"proposal {int(np.setdiff1d(np.arange(len(masks)), kept)[0])} is empty; "
                                "drop empty masks first (masks.check_proposals does)")
        masks = checked
        return self.global_features(image, masks), self.local_features(image, masks)

    def text_feature(self, sentence: str, parser: str = "auto") -> Tuple[np.ndarray, NounPhrase]:
        phrase = extract_noun_phrase(sentence, parser)
        if self.encode_text is None:
            raise ClipfuseError("no text encoder: open with ReferSegmenter.open(prefix) or pass encode_text")
        return text_feature(self.encode_text, phrase), phrase

    # -- ranking ----------------------------------------------------------------------------------
    def rank(self, f_global: np.ndarray, f_local: np.ndarray, text: np.ndarray, phrase: NounPhrase,
             alpha: Optional[float] = None) -> ReferResult:
        alpha = self.default_alpha if alpha is None else float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ClipfuseError(f"alpha must be in [0, 1], got {alpha}")
        scores = cosine_scores(combine_features(f_global, f_local, alpha), text)
        return ReferResult(scores=scores, best=int(np.argmax(scores)), noun_phrase=phrase, alpha=alpha)

    def refer(self, image: np.ndarray, masks: np.ndarray, sentence: str, alpha: Optional[float] = None,
              parser: str = "auto") -> ReferResult:
        """Score every proposal against `sentence`; ClipfuseError on empty sentence / bad masks."""
        text, phrase = self.text_feature(sentence, parser)   # validates the sentence first
        f_global, f_local = self.visual_features(image, masks)
        return self.rank(f_global, f_local, text, phrase, alpha)

    def close(self) -> None:
        for item in self._closers:
            item.close()
        self._closers = []
