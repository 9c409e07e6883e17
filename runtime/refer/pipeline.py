"""Global-Local CLIP on exported graphs: numpy pre-processing, the three encoders, mask ranking.

For one image, N mask proposals at the image's resolution (bool, or soft float in [0, 1]) and a
sentence, exactly as the public code (Seonghoon-Yu/Zero-shot-RIS, data/dataset_refer_bert.py and
Our_method_with_free_solo.py):
  copy:   the image resized so its short side is 800 (torchvision T.Resize(800) on the PIL image:
          PIL bilinear, the long side truncated), the tensor the public code works from
  global: the copy resized to 224x224 + the masks resized to the ViT grid as floats (soft values
          stay soft) -> refer-global graph -> f_G [N, E]
  local:  the copy resized back to the image's size; per mask, image * m + (1 - m) * fill with
          m = (mask == 1) (the public code's mask.type(torch.uint8)), cut to the mask's FreeSOLO box,
          resized to 224x224 -> refer-local graph -> f_L [N, E]
  text:   t = 0.5 * enc(sentence) + 0.5 * enc(noun phrase), raw features, no templates
  f = alpha * f_G + (1 - alpha) * f_L (raw); score = cos(f, t); the answer is the best mask.

Parity notes:
- The fill is the constant (0.485, 0.456, 0.406) in the NORMALISED space (fill="public"), i.e. a
  light grey after un-normalising; fill="mean" uses the mean colour (0 after normalisation).
- Resizes of the tensor (224 image, copy back to the image size, masks to the grid, crops) are
  torchvision 0.11's tensor resize, i.e. torch bilinear, align_corners=False, no antialias
  (`resize_bilinear_torch`); the 800-pixel copy is Pillow's own bilinear (antialiased) resize.
  The pipeline resizes on the 0..255 scale and the graphs normalise: the public code normalises
  first, which is the same up to float rounding (bilinear weights sum to 1).
- A soft mask's box is that of its support (mask > 0); FreeSOLO's masks are binary, where the two
  agree. A one-pixel-high (or -wide) mask on the first row (column) gets a 1-pixel box where the
  public code's box is empty (and its resize would fail).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..backends.base import run_in_chunks
from ..errors import ClipfuseError
from ..manifest import Manifest, ReferManifest
from .nounphrase import NounPhrase, extract_noun_phrase

# The public code's fill, a constant in the normalised space (see module docstring).
PUBLIC_FILL = (0.485, 0.456, 0.406)
FILL_MODES = ("public", "mean")
DEFAULT_ALPHA = 0.95                      # RefCOCO / RefCOCO+; RefCOCOg uses 0.85
DATASET_ALPHA = {"refcoco": 0.95, "refcoco+": 0.95, "refcocog": 0.85}
TEXT_WEIGHT = 0.5                         # t = 0.5 * sentence + 0.5 * noun phrase
COPY_SHORT_SIDE = 800                     # data/dataset_refer_bert.py: T.Resize(800)
METHOD = "global-local-clip"
PREPROCESS = "public-800"                 # prepare_image: the public code's 800-pixel copy


def refer_section(alpha: float, masked_blocks: int, fill: str) -> dict:
    """The `refer` part of both graphs' manifests. Written by `export-refer` from the constants
    above (one source); ReferSegmenter reads every field back, so a graph made for other
    settings is run with them or refused."""
    return {"method": METHOD, "alpha": alpha, "alpha_by_dataset": dict(DATASET_ALPHA),
            "masked_blocks": masked_blocks, "text_weight": TEXT_WEIGHT, "fill": fill,
            "preprocess": PREPROCESS, "fill_normalized": list(PUBLIC_FILL)}

EncodeText = Callable[[Sequence[str]], np.ndarray]    # texts -> raw features [N, E]


# ---------------------------------------------------------------------------------------------
# Pre-processing
# ---------------------------------------------------------------------------------------------
def _torch_taps(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source taps of torch's bilinear upsample (align_corners=False, size given), float32 math
    as its CPU kernel: src = max(scale * (dst + 0.5) - 0.5, 0), scale = n_in / n_out."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def resize_bilinear_torch(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize axes 0 and 1 of a float array to `size` (h, w) the way the public code's torchvision
    0.11 tensor resize does: torch bilinear, align_corners=False, NO antialias, no rounding.
    (Not clipfuse.runtime.protocol's resize: that one reproduces OpenCV for the dense methods.)"""
    x = np.asarray(x)          # any dtype: rows/columns are gathered before the float32 cast
    for axis, out in ((0, size[0]), (1, size[1])):
        if x.shape[axis] == out:
            continue
        i0, i1, w0, w1 = _torch_taps(x.shape[axis], out)
        shape = [1] * x.ndim
        shape[axis] = out
        lead = (slice(None),) * axis          # indexing, not np.take: take copies a strided view first
        x = x[lead + (i0,)].astype(np.float32) * w0.reshape(shape) \
            + x[lead + (i1,)].astype(np.float32) * w1.reshape(shape)
    return x.astype(np.float32, copy=False)


def copy_size(height: int, width: int, short: int = COPY_SHORT_SIDE) -> Tuple[int, int]:
    """(h, w) of torchvision's T.Resize(short): short side -> `short`, long side truncated."""
    if min(height, width) == short:
        return height, width
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def public_copy(image: np.ndarray, short: int = COPY_SHORT_SIDE) -> np.ndarray:
    """H x W x 3 uint8 -> the public code's 800-pixel short-side copy, uint8 (T.Resize(800) on a
    PIL image = Pillow's bilinear resize, which antialiases when it shrinks)."""
    from PIL import Image

    image = np.asarray(image, dtype=np.uint8)
    h, w = copy_size(image.shape[0], image.shape[1], short)
    if (h, w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


@dataclass
class PreparedImage:
    """The two views of one image that the public code feeds CLIP (0..255 pixel scale, float32)."""
    global_image: np.ndarray           # [1, S, S, 3]: the copy resized to S x S
    restored: np.ndarray               # [H, W, 3]: the copy resized back to the image's size

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.restored.shape[:2])


def prepare_image(image: np.ndarray, size: int = 224) -> PreparedImage:
    """H x W x 3 uint8 -> PreparedImage (800-pixel copy, then its 224 and original-size resizes)."""
    image = np.asarray(image, dtype=np.uint8)
    copy = public_copy(image)
    return PreparedImage(global_image=resize_bilinear_torch(copy, (size, size))[None],
                         restored=resize_bilinear_torch(copy, image.shape[:2]))


def grid_masks(masks: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
    """Masks [N, H, W] (bool or soft) -> soft masks [N, g, g] float32 (bilinear of the values)."""
    m = np.moveaxis(np.asarray(masks), 0, -1)                         # [H, W, N], a view
    return np.ascontiguousarray(np.moveaxis(resize_bilinear_torch(m, grid), -1, 0))


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """FreeSOLO's box per mask, as the public code uses it: the row/column projections' centre of
    mass +- half their extent, truncated toward zero -> int [N, 4] (x1, y1, x2, y2). A soft mask's
    box is that of its support (mask > 0)."""
    masks = np.asarray(masks) > 0
    cols = masks.any(axis=1).astype(np.float64)          # [N, W] width projection
    rows = masks.any(axis=2).astype(np.float64)          # [N, H] height projection
    width, height = cols.sum(1), rows.sum(1)
    if (width == 0).any():
        raise ClipfuseError("an empty mask has no box; drop empty masks first")
    cx = (cols * np.arange(cols.shape[1])).sum(1) / width
    cy = (rows * np.arange(rows.shape[1])).sum(1) / height
    box = np.stack([cx - 0.5 * width, cy - 0.5 * height, cx + 0.5 * width, cy + 0.5 * height], 1)
    return np.trunc(box).astype(np.int64)


def fill_pixel(mean: Sequence[float], std: Sequence[float], fill: str = "public",
               public_fill: Sequence[float] = PUBLIC_FILL) -> np.ndarray:
    """The fill colour on the 0..255 pixel scale that the graph's normalisation maps to the
    public code's normalised fill `public_fill` (or to 0 for fill="mean")."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if fill == "public":
        return (np.asarray(public_fill, np.float32) * std + mean) * 255.0
    if fill == "mean":
        return mean * 255.0
    raise ClipfuseError(f"unknown fill {fill!r}; choose one of: {', '.join(FILL_MODES)}")


def local_crops(restored: np.ndarray, masks: np.ndarray, mean: Sequence[float], std: Sequence[float],
                fill: str = "public", size: int = 224, public_fill: Sequence[float] = PUBLIC_FILL) -> np.ndarray:
    """Masked, box-cropped, resized crops of `restored` (PreparedImage.restored, H x W x 3 on the
    0..255 scale) -> float32 [N, size, size, 3]. Only mask pixels equal to 1 keep the image
    (the public code's mask.type(torch.uint8)). (The box never leaves the image: a projection's
    centre -+ half its count stays within [-0.5, W - 0.5], which truncates into [0, W].)"""
    restored = np.asarray(restored, dtype=np.float32)
    fill_px = fill_pixel(mean, std, fill, public_fill)
    out = np.empty((len(masks), size, size, 3), dtype=np.float32)
    for n, (mask, (x1, y1, x2, y2)) in enumerate(zip(masks, mask_boxes(masks))):
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)        # a mask in row/column 0 alone still gets one
        m = (np.asarray(mask[y1:y2, x1:x2]) == 1)[..., None].astype(np.float32)
        crop = restored[y1:y2, x1:x2] * m + (1.0 - m) * fill_px
        out[n] = resize_bilinear_torch(crop, (size, size))
    return out


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


def text_feature(encode: EncodeText, phrase: NounPhrase, weight: float = TEXT_WEIGHT) -> np.ndarray:
    """t = w * enc(sentence) + (1 - w) * enc(noun phrase) (w = 0.5), raw features -> [E]."""
    feats = np.asarray(encode([phrase.sentence, phrase.phrase]), dtype=np.float32)
    return weight * feats[0] + (1.0 - weight) * feats[1]


# ---------------------------------------------------------------------------------------------
# Graphs
# ---------------------------------------------------------------------------------------------
def _open(path: Path, kind: str, backend: str, options: Optional[dict]):
    from ..artifact import open_artifact
    from ..backends.base import open_backend

    opened = open_artifact(path, kinds=(kind,), what="graph", hint="run `clipfuse export-refer` first")
    return open_backend(path, opened.manifest, backend, **(options or {})), opened


def graph_paths(prefix: "str | Path") -> Dict[str, Path]:
    """engines/NAME -> engines/NAME-global.onnx, -local.onnx, -text.onnx (.engine if present)."""
    prefix = Path(prefix)
    out = {}
    for part in ("global", "local", "text"):
        onnx_path = prefix.with_name(f"{prefix.name}-{part}.onnx")
        engine = prefix.with_name(f"{prefix.name}-{part}.engine")
        out[part] = engine if engine.exists() else onnx_path
    return out


def same_weights(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests were exported from one CLIP (random weights: also the same seed)."""
    if (a.model, a.pretrained) != (b.model, b.pretrained):
        return False
    return a.pretrained != "none" or a.seed == b.seed


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
        self.global_runner, opened_global = _open(Path(global_path), "refer-global", backend, backend_options)
        self.local_runner, opened_local = _open(Path(local_path), "refer-local", backend, backend_options)
        # JSON forms (what the graphs were exported with) and the typed ones everything here reads
        self.global_manifest, self.local_manifest = opened_global.manifest, opened_local.manifest
        gm: ReferManifest = opened_global.meta
        lm: ReferManifest = opened_local.meta
        self.global_meta, self.local_meta = gm, lm
        image_dtype = {i.name: i.dtype for i in gm.inputs}.get("image")
        if image_dtype != "float32":
            raise ClipfuseError(f"{Path(global_path).name} takes a {image_dtype} image: it was exported by an "
                                "older clipfuse whose uint8 input rounds the public code's 224 image; "
                                "re-export with `clipfuse export-refer`")
        if not same_weights(gm, lm):
            raise ClipfuseError(f"{Path(global_path).name} and {Path(local_path).name} come from different "
                                "weights; export them together with `clipfuse export-refer`")
        if not (gm.grid and gm.input_size and lm.input_size and gm.normalization):
            raise ClipfuseError(f"{Path(global_path).name}: manifest lacks grid, input_size or normalization; "
                                "re-export with `clipfuse export-refer`")
        self.grid = tuple(gm.grid)
        self.input_size = int(gm.input_size[0])
        self.local_size = int(lm.input_size[0])
        self.mean, self.std = gm.normalization["mean"], gm.normalization["std"]
        refer = gm.refer or {}
        for key, supported in (("method", METHOD), ("preprocess", PREPROCESS)):
            if refer.get(key, supported) != supported:
                raise ClipfuseError(f"{Path(global_path).name} was exported for {key} {refer[key]!r}; this "
                                    f"runtime implements {supported!r}: re-export with `clipfuse export-refer`")
        self.default_alpha = float(refer.get("alpha", DEFAULT_ALPHA))
        self.alpha_by_dataset = dict(refer.get("alpha_by_dataset", DATASET_ALPHA))
        self.text_weight = float(refer.get("text_weight", TEXT_WEIGHT))
        self.masked_blocks = refer.get("masked_blocks")      # baked into the graph; reported by eval-refer
        self.fill = (lm.refer or {}).get("fill", "public")
        self.public_fill = tuple((lm.refer or {}).get("fill_normalized", PUBLIC_FILL))
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
        if not same_weights(encoder.meta, seg.global_meta):
            seg.close()
            encoder.close()
            raise ClipfuseError(f"{text_path.name} was exported from other weights than the refer graphs; "
                                "export both from the same --model/--pretrained/--seed")
        seg._closers.append(encoder)
        return seg

    # -- features ---------------------------------------------------------------------------------
    def prepare(self, image: Union[np.ndarray, PreparedImage]) -> PreparedImage:
        """The public code's views of `image` (H x W x 3 uint8); a PreparedImage passes through."""
        if isinstance(image, PreparedImage):
            return image
        return prepare_image(image, self.input_size)

    def global_features(self, image: Union[np.ndarray, PreparedImage], masks: np.ndarray) -> np.ndarray:
        feeds = {"image": self.prepare(image).global_image, "masks": grid_masks(masks, self.grid)}
        return run_in_chunks(self.global_runner, feeds, "masks")["features"]

    def local_features(self, image: Union[np.ndarray, PreparedImage], masks: np.ndarray,
                       fill: Optional[str] = None) -> np.ndarray:
        crops = local_crops(self.prepare(image).restored, masks, self.mean, self.std, fill or self.fill,
                            self.local_size, self.public_fill)
        return run_in_chunks(self.local_runner, {"crops": crops}, "crops")["features"]

    def visual_features(self, image: Union[np.ndarray, PreparedImage],
                        masks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(f_G, f_L) for proposals `masks` ([N, H, W] at the image's resolution: bool, or soft
        float in [0, 1])."""
        from .masks import check_proposals
        prepared = self.prepare(image)
        checked, kept = check_proposals(masks, prepared.shape)
        if len(kept) != len(masks):
            raise ClipfuseError(f"proposal {int(np.setdiff1d(np.arange(len(masks)), kept)[0])} is empty; "
                                "drop empty masks first (masks.check_proposals does)")
        return self.global_features(prepared, checked), self.local_features(prepared, checked)

    def text_feature(self, sentence: str, parser: str = "auto") -> Tuple[np.ndarray, NounPhrase]:
        phrase = extract_noun_phrase(sentence, parser)
        if self.encode_text is None:
            raise ClipfuseError("no text encoder: open with ReferSegmenter.open(prefix) or pass encode_text")
        return text_feature(self.encode_text, phrase, self.text_weight), phrase

    # -- ranking ----------------------------------------------------------------------------------
    def alpha_for(self, dataset: str) -> float:
        """The paper's alpha for `dataset` as the graphs record it (RefCOCOg 0.85, else 0.95)."""
        if dataset not in self.alpha_by_dataset:
            raise ClipfuseError(f"no alpha recorded for dataset {dataset!r}; pass --alpha")
        return float(self.alpha_by_dataset[dataset])

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
