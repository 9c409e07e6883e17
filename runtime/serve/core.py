"""Segment a Triton batch: every image's windows go through the backend in shared calls.

Triton's dynamic batcher hands a model instance several requests at once (requests whose images
have the same shape). `segment_batch` cuts every image's window grid with the library protocol
(`plan_windows`), puts ALL windows through `infer` in chunks of at most `window_batch` (the
backend's max batch), and finishes each image (`finish_windows`). `infer` is the backend call:
`Segmenter.infer_windows` in `clipfuse serve`, a BLS request to the windows model in a
repository made by `clipfuse triton-repo`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ClipfuseError
from ..limits import SERVE_MAX_PIXELS
from ..manifest import FrameManifest, ImageManifest
from ..methods import Protocol
from ..protocol import finish_windows, infer_in_chunks, plan_windows

# Requests larger than this are refused before any work (a 8192 x 8192 image is 200 MB of uint8
# and its windows are thousands of backend rows): one caller cannot stall the server.
DEFAULT_MAX_PIXELS = SERVE_MAX_PIXELS.value

# Names of the model's tensors and of the metadata parameters in its Triton config.
INPUT = "image"
OUTPUTS = ("labels", "confidence")
PARAM_CLASSES = "clipfuse_classes"
PARAM_PROTOCOL = "clipfuse_protocol"
PARAM_KIND = "clipfuse_kind"
PARAM_WINDOW = "clipfuse_window"
PARAM_ARTIFACT = "clipfuse_artifact"


@dataclass
class BatchStats:
    """What one `segment_batch` call did (tests and logs read it)."""
    images: int
    windows: int
    backend_calls: int
    largest_call: int


def check_images(images: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse what Triton's own shape/dtype checks let through: empty or oversized images."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ClipfuseError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    height, width = images.shape[1:3]
    if height < 1 or width < 1:
        raise ClipfuseError(f"empty image {height} x {width}")
    SERVE_MAX_PIXELS.check(int(height) * int(width), f"image {height} x {width}", max_pixels)


def segment_batch(images: Sequence[np.ndarray], infer: Callable[[np.ndarray], np.ndarray],
                  protocol: Protocol, window: int, window_batch: Optional[int] = None,
                  ) -> Tuple[List[Tuple[np.ndarray, np.ndarray]], BatchStats]:
    """[H, W, 3] uint8 images -> [(labels [H, W] int32, confidence [H, W] float32)] + stats.

    The windows of all images are concatenated and sent through `infer` in chunks of
    `window_batch` (None: one call), so concurrent requests share backend calls.
    """
    plans = [plan_windows(np.asarray(image), protocol, window) for image in images]
    crops = np.concatenate([plan.crops for plan in plans], axis=0)
    scores, calls = infer_in_chunks(infer, crops, window_batch)
    if scores.shape[0] != len(crops):
        raise ClipfuseError(f"backend returned {scores.shape[0]} score maps for {len(crops)} windows")
    results, start = [], 0
    for plan in plans:
        out = finish_windows(scores[start:start + len(plan.boxes)], plan, protocol, return_scores=False,
                             return_confidence=True)
        start += len(plan.boxes)
        results.append((out.labels, out.confidence))
    stats = BatchStats(images=len(plans), windows=len(crops), backend_calls=calls,
                       largest_call=min(len(crops), int(window_batch or len(crops))))
    return results, stats


def model_parameters(meta: ImageManifest, protocol: Protocol, artifact_name: str) -> Dict[str, str]:
    """The metadata a client reads from the model config: class names, protocol, kind."""
    return {
        PARAM_CLASSES: json.dumps([list(names) for names in meta.classes]),
        PARAM_PROTOCOL: json.dumps(protocol.to_dict()),
        PARAM_KIND: str(meta.kind),
        # window graphs: the window side; frame graphs: the frame size as HxW
        PARAM_WINDOW: ("x".join(str(int(v)) for v in meta.frame_size) if isinstance(meta, FrameManifest)
                       else str(meta.window)),
        PARAM_ARTIFACT: artifact_name,
    }
