"""The frame graph: the whole sliding-window protocol inside one graph for a fixed frame size.

    frames uint8 [B, H, W, 3]  ->  labels int32 [B, H, W], confidence float32 [B, H, W],
                                   scores float32 [B, K, h, w] (averaged, processing size)

Inside, in the runtime's order (clipfuse.runtime.protocol is the source of truth for every rule):
1. short-side resize to the processing size (h, w), OpenCV's INTER_LINEAR fixed-point rule in
   int32 arithmetic: exact integer horizontal taps, then ((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1
   >> 16) rounded by (+2) >> 2, with Div by powers of two (values are non-negative, so integer Div
   is the shift). The result is bit-identical to the runtime's `resize_image`;
2. the static window grid (Slice), all windows of all frames batched through trunk + head;
3. per-window upsampling, overlap averaging and the resize to the frame as constant matrices
   composed in float64 (full = R @ S @ C^T over the tiled coarse scores, as the runtime does),
   classes on the last axis;
4. post-processing: cosine heads x logit_scale + softmax (as exp / sum: only the chosen class's
   probability is formed), area_thd, prob_thd; probability heads
   (CLIP-DINOiser: softmax and background rule already in the head) argmax as they are;
5. synonyms: baked graphs reduce them in the classifier; dynamic graphs take `class_rows` [K, S]
   (row indices of each class's names, padded with its first name) and take the max per window.

Only static-shape ops TensorRT parses: Cast, Gather, Slice, Concat, Reshape, Transpose, MatMul,
Softmax, ArgMax, ReduceMax/ReduceSum, Equal/Greater/Less, Where; no Loop, no NonZero, no Resize.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.manifest import io_spec, manifest_path_for, parse_manifest
from clipfuse.runtime.methods import Protocol
from clipfuse.runtime.protocol import (cv_linear_coefficients, cv_row_coefficients, processing_size,
                                       window_boxes, window_geometry, window_starts)

from .artifacts import graph_with_manifest
from .fused import FusedSegmenter


def parse_frame(text: str) -> Tuple[int, int]:
    """'WxH' (e.g. 1280x720) -> (H, W)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ClipfuseError(f"--frame {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if w <= 0 or h <= 0:
        raise ClipfuseError(f"--frame {text!r}: width and height must be positive")
    return h, w


class CvResize(nn.Module):
    """uint8 [B, H, W, 3] -> int32 [B, h, w, 3], cv2.resize INTER_LINEAR bit for bit."""

    def __init__(self, frame: Tuple[int, int], size: Tuple[int, int]) -> None:
        super().__init__()
        self.identity = tuple(frame) == tuple(size)
        x0, x1, a0, a1 = cv_linear_coefficients(frame[1], size[1])
        y0, y1, b0, b1 = cv_row_coefficients(frame[0], size[0])
        for name, v in (("x0", x0), ("x1", x1), ("y0", y0), ("y1", y1)):
            self.register_buffer(name, torch.from_numpy(v.astype(np.int64)), persistent=False)
        self.register_buffer("a0", torch.from_numpy(a0.astype(np.int32)).view(1, 1, -1, 1), persistent=False)
        self.register_buffer("a1", torch.from_numpy(a1.astype(np.int32)).view(1, 1, -1, 1), persistent=False)
        self.register_buffer("b0", torch.from_numpy(b0.astype(np.int32)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("b1", torch.from_numpy(b1.astype(np.int32)).view(1, -1, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # uint8 goes straight into a Cast (TensorRT's parser accepts uint8 only there)
        x = frames.to(torch.float32).to(torch.int32)
        if self.identity:
            return x
        horiz = x.index_select(2, self.x0) * self.a0 + x.index_select(2, self.x1) * self.a1
        horiz = torch.div(horiz, 16, rounding_mode="trunc")
        top = torch.div(horiz.index_select(1, self.y0) * self.b0, 65536, rounding_mode="trunc")
        bottom = torch.div(horiz.index_select(1, self.y1) * self.b1, 65536, rounding_mode="trunc")
        out = torch.div(top + bottom + 2, 4, rounding_mode="trunc")
        return out.clamp(0, 255)


class FrameSegmenter(nn.Module):
    """frames uint8 [B, H, W, 3] (+ class_embeddings [R, E], class_rows [K, S] when dynamic)
    -> (labels int32 [B, H, W], confidence float32 [B, H, W], scores float32 [B, K, h, w])."""

    def __init__(self, fused: FusedSegmenter, protocol: Protocol, frame: Tuple[int, int],
                 grid: Tuple[int, int], dynamic: bool) -> None:
        super().__init__()
        self.fused = fused
        self.protocol = protocol
        self.dynamic = dynamic
        self.window = protocol.window
        self.size = processing_size(frame[0], frame[1], protocol.short_side, protocol.long_side_max)
        self.resize = CvResize(frame, self.size)
        self.boxes = window_boxes(self.size[0], self.size[1], self.window, protocol.stride)
        self.ny = len(window_starts(self.size[0], self.window, protocol.stride))
        self.nx = len(window_starts(self.size[1], self.window, protocol.stride))
        self.grid = grid
        rows, cols, _ = window_geometry(frame[0], frame[1], self.size[0], self.size[1], self.window,
                                        protocol.stride, grid[0], grid[1])
        prow, pcol, _ = window_geometry(0, 0, self.size[0], self.size[1], self.window, protocol.stride,
                                        grid[0], grid[1], to_output=False)
        for name, m in (("rows", rows), ("cols", cols), ("prow", prow), ("pcol", pcol)):
            # a copy: the runtime's cached tables are read-only and shared
            self.register_buffer(name, torch.from_numpy(np.array(m, dtype=np.float32)), persistent=False)

    def windows(self, image: torch.Tensor) -> torch.Tensor:
        """int32 [B, h, w, 3] -> float32 [B * n, S, S, 3], frame-major then row-major windows."""
        h, w = self.size
        s = self.window
        if h < s or w < s:  # small frames: black padding on the bottom/right, as the runtime
            image = nn.functional.pad(image, (0, 0, 0, max(0, s - w), 0, max(0, s - h)))
        crops = [image[:, y:y + s, x:x + s] for y, x in self.boxes]
        return torch.stack(crops, 1).reshape(-1, s, s, 3).to(torch.float32)

    def forward(self, frames: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None,
                class_rows: Optional[torch.Tensor] = None):
        crops = self.windows(self.resize(frames))
        scores = self.fused(crops, class_embeddings)                       # [B*n, R|K, gy, gx]
        if self.dynamic:
            k, s = class_rows.shape
            gathered = scores.index_select(1, class_rows.reshape(-1))      # [B*n, K*S, gy, gx]
            scores = gathered.reshape(scores.shape[0], k, s, *self.grid).amax(2)
        gy, gx = self.grid
        k = scores.shape[1]
        tiled = (scores.reshape(-1, self.ny, self.nx, k, gy, gx).permute(0, 1, 4, 2, 5, 3)
                 .reshape(-1, self.ny * gy, self.nx * gx * k))              # [B, ny*gy, nx*gx*K]
        # classes on the LAST axis from here: reductions and broadcasts over a trailing axis are
        # the fast ones in ONNX Runtime and TensorRT (a class-axis Softmax at dim 1 took seconds)
        averaged = self.pcol @ (self.prow @ tiled).reshape(-1, self.size[0], self.nx * gx, k)  # [B, h, w, K]
        full = self.cols @ (self.rows @ tiled).reshape(-1, self.rows.shape[0], self.nx * gx, k)  # [B, H, W, K]
        labels, confidence = self.postprocess(full)
        return labels.to(torch.int32), confidence, averaged.permute(0, 3, 1, 2)

    def postprocess(self, full: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """full [B, H, W, K] -> labels, probability of the chosen class. No Softmax op: argmax of
        the logits, and the chosen probability as exp(s (l - max)) / sum exp(s (x - max))."""
        p = self.protocol
        if p.score_type == "probability":
            confidence, labels = full.max(-1)
            return labels, confidence
        scale = float(p.logit_scale)
        top, labels = full.max(-1, keepdim=True)                            # [B, H, W, 1]
        denom = torch.exp((full - top) * scale).sum(-1)                     # [B, H, W]
        k = full.shape[-1]
        if p.area_thd is not None and k > 1:
            classes = torch.arange(k, dtype=labels.dtype, device=labels.device).view(1, 1, 1, k)
            area = (labels == classes).to(torch.float32).sum((1, 2))        # [B, K]
            foreground = area[:, 1:]
            keep = foreground > float(p.area_thd) * foreground.sum(1, keepdim=True)
            keep = torch.cat([torch.ones_like(keep[:, :1]), keep], 1)[:, None, None, :]
            kept_top, labels = torch.where(keep, full, torch.full_like(full, -1e30)).max(-1, keepdim=True)
            confidence = torch.exp((kept_top - top) * scale)[..., 0] / denom
        else:
            confidence = 1.0 / denom
        labels = labels[..., 0]
        if p.prob_thd:
            labels = torch.where(confidence < float(p.prob_thd), torch.zeros_like(labels), labels)
        return labels, confidence


def frame_manifest(window_manifest: dict, frame: Tuple[int, int], size: Tuple[int, int],
                   num_windows: int, onnx_path: Path) -> dict:
    """The window graph's manifest, re-declared as kind "frame" with the frame contract."""
    m = dict(window_manifest)
    meta = parse_manifest(window_manifest)
    h, w = frame
    dynamic = meta.dynamic_vocab
    k = "classes" if dynamic else len(meta.classes)
    inputs = [io_spec("frames", "uint8", ["batch", h, w, 3], "NHWC",
                      description="RGB frames, 0..255, exactly this size; everything else happens in the graph")]
    if dynamic:
        inputs.append(io_spec("class_embeddings", "float32", ["rows", meta.embed_dim], "RE",
                              description="L2-normalised text embedding per class NAME"))
        inputs.append(io_spec("class_rows", "int64", ["classes", "names"], "KS",
                              description="row indices of each class's names, padded with its first name"))
    outputs = [io_spec("labels", "int32", ["batch", h, w], "NHW", description="class index per pixel"),
               io_spec("confidence", "float32", ["batch", h, w], "NHW",
                       description="probability of the chosen class before prob_thd (cosine: "
                                   "softmax(logit_scale x score) over all classes)"),
               io_spec("scores", "float32", ["batch", k, size[0], size[1]], "NCHW",
                       description="averaged window scores at the processing size")]
    m.update(kind="frame", frame_size=[h, w], processing_size=list(size), num_windows=num_windows,
             inputs=inputs, outputs=outputs, onnx_file=onnx_path.name, onnx_sha256=None)
    return m


def export_frame_graph(build, window_manifest: dict, frame: Tuple[int, int], onnx_path: Path,
                       opset: int, log=lambda msg: None, overrides: Optional[dict] = None) -> Path:
    """Write `onnx_path` + manifest for the fused module of `build` (export.api.FusedBuild).

    `overrides`: protocol fields (protocol.OVERRIDABLE) baked into the graph instead of the head's
    defaults, e.g. SCLIP's VOC rules {logit_scale: 65, prob_thd: 0.1, area_thd: 0.1}.
    """
    from clipfuse.runtime.protocol import protocol_from_manifest
    protocol = protocol_from_manifest(window_manifest, **(overrides or {}))
    baked = dict(parse_manifest(window_manifest).protocol, **{
        k: v for k, v in (overrides or {}).items() if v is not None})
    window_manifest = dict(window_manifest, protocol=baked)
    dynamic = build.vocab_mode == "dynamic"
    module = FrameSegmenter(build.module, protocol, frame, build.grid, dynamic).eval()
    manifest = frame_manifest(window_manifest, frame, module.size, len(module.boxes), onnx_path)
    manifest.update(protocol=dict(baked))
    frames = torch.randint(0, 256, (1, frame[0], frame[1], 3), dtype=torch.uint8)
    args: tuple = (frames,)
    names = ["frames"]
    axes = {"frames": {0: "batch"}, "labels": {0: "batch"}, "confidence": {0: "batch"}, "scores": {0: "batch"}}
    if dynamic:
        from .classifier import synonym_index
        from clipfuse.runtime.vocab import class_of_name
        rows = synonym_index(class_of_name(build.vocabulary))
        if rows is None:
            rows = torch.arange(len(build.vocabulary)).view(-1, 1)
        args = (frames, build.name_embeddings, rows.to(torch.int64))
        names += ["class_embeddings", "class_rows"]
        axes.update(class_embeddings={0: "rows"}, class_rows={0: "classes", 1: "names"})
        axes["scores"][1] = "classes"
    log(f"exporting frame graph {frame[1]}x{frame[0]} (processing {module.size[1]}x{module.size[0]}, "
        f"{len(module.boxes)} windows of {protocol.window})")
    t0 = time.time()
    import warnings
    with graph_with_manifest(onnx_path, manifest) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(tmp), dynamo=False, input_names=names,
                              output_names=["labels", "confidence", "scores"], dynamic_axes=axes,
                              opset_version=opset, do_constant_folding=True)
    log(f"wrote {onnx_path} and {manifest_path_for(onnx_path).name} in {time.time() - t0:.1f} s")
    return onnx_path
