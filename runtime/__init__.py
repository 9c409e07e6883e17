"""clipfuse.runtime: run exported dense-CLIP segmenters with numpy + an inference backend.

Nothing in this package imports torch or open_clip at import time: this is what goes on a Jetson.
"""
from ._version import __version__
from .errors import ClipfuseError
from .segmenter import Segmenter

__all__ = ["__version__", "ClipfuseError", "Segmenter"]
