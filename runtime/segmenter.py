"""Segmenter: an exported graph (.onnx) or built engine (.engine) + its manifest, ready to segment.

    seg = Segmenter.open("engines/sclip.onnx")                 # backend picked by suffix
    result = seg.segment(rgb_uint8)                            # result.labels: [H, W] int32
    seg.class_names[result.labels[0, 0]]

Opening checks that the artifact and its manifest belong together (clipfuse.runtime.artifact:
SHA-256 of the file, and the contract stored in the graph), so a re-exported graph with a stale
manifest, or a manifest whose class names were edited, is refused instead of mislabelled.
The protocol defaults come from the manifest; keyword overrides replace single fields.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .artifact import open_artifact
from .backends.base import Backend, open_backend
from .errors import ClipfuseError
from .manifest import FrameManifest, ImageManifest, Manifest, parse_manifest
from .methods import Protocol
from .protocol import (OVERRIDABLE, ProtocolOutput, protocol_from_manifest,  # noqa: F401 (re-exported)
                       require_finite_scores, run_protocol)


@dataclass
class SegmentationResult:
    labels: np.ndarray                   # [H, W] int32 class indices into class_names
    class_names: List[str]               # first name of each class
    scores: Optional[np.ndarray] = None  # [K, h, w] averaged window scores at processing_size
    processing_size: tuple = ()
    num_windows: int = 0
    confidence: Optional[np.ndarray] = None  # [H, W] probability of the chosen class (if asked)


class Segmenter:
    def __init__(self, artifact: Path, manifest: Union[dict, Manifest], backend: Backend, protocol: Protocol,
                 batch: Optional[int] = None) -> None:
        self.artifact = artifact
        meta = parse_manifest(manifest, Path(artifact).name)
        if not isinstance(meta, ImageManifest):
            raise ClipfuseError(f"{Path(artifact).name} is a {meta.kind!r} artifact; expected an image or frame graph")
        self.meta: ImageManifest = meta
        self.manifest = meta.to_dict() if isinstance(manifest, Manifest) else manifest   # the JSON form
        self.backend = backend
        self.protocol = protocol
        self.window = meta.window
        # A frame graph (kind "frame") runs the whole protocol for one fixed frame size.
        self.frame_size: Optional[tuple] = tuple(meta.frame_size) if isinstance(meta, FrameManifest) else None
        limits = [b for b in (batch, backend.max_batch) if b]
        self.batch: Optional[int] = min(limits) if limits else None
        self.classes: List[List[str]] = [list(names) for names in meta.classes]
        self.dynamic_vocab = meta.dynamic_vocab
        # Text-path hook: with a dynamic vocabulary the graph takes `class_embeddings` [R, E]
        # (L2-normalised rows); row r belongs to class row_class[r] and a class's score is the max
        # over its rows (synonyms), taken per window before averaging, as the baked graph does.
        self.class_embeddings: Optional[np.ndarray] = None
        self.row_class: Optional[np.ndarray] = None

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, artifact: Union[str, Path], backend: str = "auto", batch: Optional[int] = None,
             backend_options: Optional[Dict] = None, verify: bool = True,
             **protocol_overrides) -> "Segmenter":
        """Open `artifact` (.onnx or .engine) with its manifest `artifact.json`.

        `protocol_overrides`: any of OVERRIDABLE; None values are ignored (CLI defaults).
        `verify=False` skips the SHA-256 check (hashing a big engine on a slow SD card costs time).
        """
        opened = open_artifact(artifact, kinds=("image", "frame"), verify=verify,
                               hint="`run` needs an image or frame graph from `clipfuse export`")
        artifact, manifest = opened.path, opened.meta
        if manifest.kind == "frame":
            changed = sorted(k for k, v in protocol_overrides.items() if v is not None)
            if changed:
                raise ClipfuseError(f"{artifact.name} is a frame graph: its protocol is baked in, so "
                                    f"{', '.join(changed)} cannot be overridden; re-export with "
                                    "`clipfuse export --frame`, or use a window graph")
        protocol = protocol_from_manifest(manifest, **protocol_overrides)
        be = open_backend(artifact, manifest, backend, **(backend_options or {}))
        return cls(artifact, manifest, be, protocol, batch=batch)

    # -- vocabulary -----------------------------------------------------------------------------
    @property
    def class_names(self) -> List[str]:
        return [names[0] for names in self.classes]

    def set_class_embeddings(self, embeddings: np.ndarray,
                             classes: Optional[Sequence[Sequence[str]]] = None) -> None:
        """Dynamic vocabulary: one L2-normalised row per NAME of `classes` (flattened in order).

        `classes` defaults to the manifest's; passing new classes changes the vocabulary.
        """
        if not self.dynamic_vocab:
            raise ClipfuseError(f"{self.artifact.name} has a baked vocabulary; re-export with "
                                "--vocab dynamic to change classes at run time")
        classes = [list(c) for c in (classes if classes is not None else self.classes)]
        row_class = np.array([k for k, names in enumerate(classes) for _ in names], dtype=np.int64)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(row_class):
            raise ClipfuseError(f"class_embeddings must be [{len(row_class)}, E] (one row per class "
                                f"name), got {list(embeddings.shape)}")
        embed_dim = self.meta.embed_dim
        if embed_dim and embeddings.shape[1] != int(embed_dim):
            raise ClipfuseError(f"class_embeddings have width {embeddings.shape[1]}, "
                                f"the model needs {embed_dim}")
        self.classes, self.class_embeddings, self.row_class = classes, embeddings, row_class

    def _vocabulary_feeds(self) -> Dict[str, np.ndarray]:
        """The extra inputs of a dynamic-vocabulary graph (none for baked ones); a frame graph
        also takes each class's rows (its synonyms), a window graph reduces them on the host."""
        if not self.dynamic_vocab:
            return {}
        if self.class_embeddings is None:
            raise ClipfuseError(f"{self.artifact.name} has a dynamic vocabulary: compute class "
                                "embeddings first (Segmenter.set_class_embeddings)")
        feeds = {"class_embeddings": self.class_embeddings}
        if self.frame_size is not None:
            feeds["class_rows"] = class_rows(self.row_class, len(self.classes))
        return feeds

    # -- inference ------------------------------------------------------------------------------
    def infer_windows(self, crops: np.ndarray) -> np.ndarray:
        """[B, S, S, 3] uint8 windows -> [B, K, g, g] class scores (one backend call)."""
        outputs = self.backend.run({"image": crops, **self._vocabulary_feeds()})
        scores = outputs.get("scores", next(iter(outputs.values())))
        if self.dynamic_vocab and self.row_class is not None and len(self.row_class) != len(self.classes):
            reduced = np.full((scores.shape[0], len(self.classes)) + scores.shape[2:], -np.inf, np.float32)
            for row, k in enumerate(self.row_class):
                np.maximum(reduced[:, k], scores[:, row], out=reduced[:, k])
            scores = reduced
        return scores

    def segment(self, image: np.ndarray, return_scores: bool = False, return_confidence: bool = False,
                timings: Optional[dict] = None) -> SegmentationResult:
        """Segment one H x W x 3 uint8 RGB image with the protocol (see clipfuse.runtime.protocol).

        `timings`: a dict that receives seconds per stage (resize, windows, model, protocol,
        postprocess), for profiling.
        """
        if self.frame_size is not None:
            return self._segment_frame(np.asarray(image), return_scores, return_confidence, timings)
        out: ProtocolOutput = run_protocol(np.asarray(image), self.infer_windows, self.protocol,
                                           self.window, self.batch, return_scores=return_scores,
                                           return_confidence=return_confidence, timings=timings)
        if out.num_classes != len(self.classes):
            raise ClipfuseError(f"graph returned {out.num_classes} classes but the manifest "
                                f"lists {len(self.classes)}")
        return SegmentationResult(labels=out.labels, class_names=self.class_names, scores=out.scores,
                                  processing_size=out.processing_size, num_windows=out.num_windows,
                                  confidence=out.confidence)

    def _segment_frame(self, image: np.ndarray, return_scores: bool, return_confidence: bool,
                       timings: Optional[dict]) -> SegmentationResult:
        """One call of the frame graph: the frame in, labels (+ confidence, scores) out."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ClipfuseError(f"expected an H x W x 3 uint8 RGB image, got {image.dtype} {image.shape}")
        outputs = self.segment_frames(image[None], timings)
        return SegmentationResult(
            labels=outputs["labels"][0], class_names=self.class_names,
            scores=outputs["scores"][0] if return_scores else None,
            processing_size=tuple(self.meta.processing_size),
            num_windows=self.meta.num_windows,
            confidence=outputs["confidence"][0] if return_confidence else None)

    def segment_frames(self, frames: np.ndarray, timings: Optional[dict] = None) -> Dict[str, np.ndarray]:
        """Frame graphs: [B, H, W, 3] uint8 frames of the graph's size -> {"labels" [B, H, W] int32,
        "confidence" [B, H, W] float32, "scores" [B, K, h, w]} in ONE backend call (a server puts
        concurrent requests' frames through together)."""
        if self.frame_size is None:
            raise ClipfuseError(f"{self.artifact.name} is a window graph; segment() runs the protocol")
        h, w = self.frame_size
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
            raise ClipfuseError(f"expected [B, H, W, 3] uint8 frames, got {frames.dtype} {frames.shape}")
        if tuple(frames.shape[1:3]) != (h, w):
            raise ClipfuseError(f"{self.artifact.name} is a frame graph for {w}x{h} frames, this image is "
                                f"{frames.shape[2]}x{frames.shape[1]}: resize or crop it to {w}x{h}, export a "
                                f"frame graph for its size (clipfuse export --frame "
                                f"{frames.shape[2]}x{frames.shape[1]}), or use a window graph (clipfuse "
                                "export without --frame) for images of any size")
        t0 = time.perf_counter()
        outputs = self.backend.run({"frames": frames, **self._vocabulary_feeds()})
        if timings is not None:
            timings["model"] = timings.get("model", 0.0) + time.perf_counter() - t0
        if outputs["scores"].shape[1] != len(self.classes):
            raise ClipfuseError(f"graph returned {outputs['scores'].shape[1]} classes but the manifest "
                                f"lists {len(self.classes)}")
        require_finite_scores(outputs["scores"])   # the graph's labels came from these scores
        return {"labels": np.asarray(outputs["labels"], dtype=np.int32),
                "confidence": np.asarray(outputs["confidence"], dtype=np.float32),
                "scores": outputs["scores"]}

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def class_rows(row_class: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, S] int64 row indices of each class's names, padded with its first row (the frame
    graph's `class_rows` input; same layout as the baked classifier's synonym index)."""
    rows = [np.flatnonzero(row_class == k) for k in range(num_classes)]
    if any(len(r) == 0 for r in rows):
        raise ClipfuseError("every class needs at least one name")
    width = max(len(r) for r in rows)
    return np.array([list(r) + [r[0]] * (width - len(r)) for r in rows], dtype=np.int64)
