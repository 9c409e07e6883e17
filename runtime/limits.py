"""Every resource bound of clipfuse in one place: what it bounds, its value, the option that moves it.

The rule: a size that reaches an allocation (image sides and pixels, request shapes, proposal
coordinates, RLE sizes, mask stacks, resize tables, caches, instances, batch sizes, clients) is
checked against a bound here BEFORE anything is allocated, and a violation is one line that names
the bound and the option that moves it (`Limit.check`, or the argparse types `Limit.option_type`
builds for numeric options). Nothing is clamped silently.

Option bounds are generous for real deployments and small enough that the worst case cannot take
a 24 GB host down: e.g. 64 instances x a ViT-B/16 session is ~40 GB of weights only on the GPU
side, so more is a typo, not a deployment.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import ClipfuseError


@dataclass(frozen=True)
class Limit:
    """One bound: `what` it bounds, `value`, the `option` that moves it ('' = fixed)."""
    what: str
    value: int
    option: str = ""
    unit: str = ""

    def moves(self) -> str:
        return f"raise {self.option}" if self.option else "a fixed limit"

    def exceeded(self, got: object, subject: str = "", value: Optional[int] = None) -> ClipfuseError:
        """The one-line error for `got` above the bound (`value`: the bound in force, if moved)."""
        limit = self.value if value is None else value
        unit = f" {self.unit}" if self.unit else ""
        head = f"{subject}: " if subject else ""
        return ClipfuseError(f"{head}{self.what} {got} is above the limit of {limit}{unit} ({self.moves()})")

    def check(self, got: int, subject: str = "", value: Optional[int] = None) -> None:
        """Raise ClipfuseError when `got` > the bound (`value` overrides the default bound)."""
        if got > (self.value if value is None else value):
            raise self.exceeded(got, subject, value)

    def option_type(self, low: int = 1) -> Callable[[str], int]:
        """argparse type for the option itself: an integer in [low, value]."""
        def parse(text: str) -> int:
            try:
                number = int(text.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
            if number < low or number > self.value:
                raise argparse.ArgumentTypeError(f"must be >= {low} and <= {self.value}, got {number}")
            return number
        parse.__name__ = "integer"
        return parse


# --- serving (clipfuse serve, triton-repo, bench-serve) ----------------------------------------
# Model instances per artifact: each holds a backend session and (PyTriton) shared-memory buffers.
INSTANCES = Limit("model instances", 64, "--instances")
# Images per Triton batch of the protocol model (requests batched together).
MAX_BATCH_SIZE = Limit("images per Triton batch", 256, "--max-batch-size")
# Windows per backend call.
WINDOW_BATCH = Limit("windows per backend call", 4096, "--window-batch")
QUEUE_DELAY_US = Limit("queue delay", 10_000_000, "--queue-delay-us", "us")
DRAIN_TIMEOUT_S = Limit("drain timeout", 3600, "--drain-timeout", "s")
THREADS = Limit("threads", 1024, "--threads")
# Pixels of one served image. The default keeps one request's memory near 0.6 GB (docs/serving.md);
# the option may raise it up to SERVE_MAX_PIXELS_CAP.
SERVE_MAX_PIXELS = Limit("image pixels", 4096 * 4096, "--max-pixels")
SERVE_MAX_PIXELS_CAP = Limit("--max-pixels", 8192 * 8192, "")
# Bytes of one request's input tensor as Triton receives it, checked on the declared shape
# before the server reads any data (= SERVE_MAX_PIXELS x 3 plus the batch axis).
LOG_VERBOSE = Limit("log level", 10, "--log-verbose")
BENCH_CLIENTS = Limit("clients", 1024, "--clients")
BENCH_SIDE = Limit("image side", 16384, "--size", "px")
BENCH_REQUESTS = Limit("requests", 10_000_000, "--requests")
# A Triton model name becomes a folder name: letters, digits, '_', '-', '.', not starting with '.'.
MODEL_NAME_CHARS = Limit("model name length", 64, "", "characters")

# --- images and the protocol ------------------------------------------------------------------
# The resize/average tables of one geometry are (H + W) x (windows x grid) float32 values. A
# normal image needs a few MB; a 1 x 400000 strip would need GBs while holding 1.2 KB of PNG.
GEOMETRY_BYTES = Limit("resize tables", 64 << 20, "", "bytes")
# All geometries kept for reuse (serve sees many sizes): bytes, oldest dropped first.
GEOMETRY_CACHE_BYTES = Limit("resize table cache", 256 << 20, "", "bytes")

# --- mask proposals (refer --masks, eval-refer) -----------------------------------------------
# Masks live at the image's resolution; a file may not declare more than the image limit.
PROPOSAL_PIXELS = Limit("mask pixels", 89_478_485, "--max-pixels")
MAX_PROPOSAL_MASKS = Limit("mask proposals", 1000, "")
# All masks of one file together (N x H x W bool); FreeSOLO-style files hold 100 masks.
PROPOSAL_STACK_BYTES = Limit("mask stack", 2 << 30, "", "bytes")
POLYGON_VERTICES = Limit("polygon vertices", 1_000_000, "")
RLE_RUNS = Limit("RLE runs", 50_000_000, "")

# --- files the runtime reads ------------------------------------------------------------------
JSON_BYTES = Limit("JSON file size", 64 << 20, "", "bytes")   # manifests, resume files
JSON_DEPTH = Limit("JSON nesting depth", 64, "")


def check_json_depth(data: object, source: str, limit: int = JSON_DEPTH.value) -> None:
    """Refuse JSON nested deeper than `limit` (iterative: deep nesting cannot overflow the stack)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise JSON_DEPTH.exceeded(f"> {limit}", source)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def load_json_text(text: str, source: str) -> object:
    """json.loads with the size and depth bounds; one ClipfuseError line for anything malformed
    (the stdlib decoder recurses per nesting level: 200,000 '[' end in RecursionError)."""
    import json

    if len(text) > JSON_BYTES.value:
        raise JSON_BYTES.exceeded(len(text), source)
    try:
        data = json.loads(text)
    except RecursionError:
        raise JSON_DEPTH.exceeded(f"> {JSON_DEPTH.value}", source) from None
    except ValueError as exc:  # JSONDecodeError, and numbers too long to convert
        raise ClipfuseError(f"{source}: not valid JSON ({str(exc).splitlines()[0]})") from None
    check_json_depth(data, source)
    return data
