"""Dense heads by name. Protocol defaults live in clipfuse.runtime.methods (torch-free)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import nn

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import METHODS

from .base import DenseHead
from .dinoiser import ClipDinoiserHead, load_dinoiser_heads
from .selfcorr import ATTENTION_FORMS, SelfCorrelationHead

# The self-correlation family: (attention form, Gaussian sigma, residual, FFN), methods.md.
SELFCORR_PRESETS: Dict[str, dict] = {
    "maskclip": dict(attn="identity", gaussian_sigma=None, residual=True, ffn=True),
    "sclip": dict(attn="qq+kk", gaussian_sigma=None, residual=True, ffn=True),
    "clearclip": dict(attn="qq", gaussian_sigma=None, residual=False, ffn=False),
    "naclip": dict(attn="kk", gaussian_sigma=5.0, residual=False, ffn=False),
}

# How each method's code resizes the positional table (see posembed.py).
POS_RULES: Dict[str, str] = {
    "maskclip": "size", "clip-dinoiser": "size", "sclip": "scale", "clearclip": "scale", "naclip": "scale",
}

HEAD_NAMES = tuple(METHODS)


def head_defaults(name: str) -> dict:
    if name not in METHODS:
        raise ClipfuseError(f"unknown head {name!r}; choose one of: {', '.join(HEAD_NAMES)}")
    if name == "clip-dinoiser":
        return {"background_rule": True}
    return dict(SELFCORR_PRESETS[name])


def build_head(name: str, visual: nn.Module, grid: Tuple[int, int], params: Optional[dict] = None,
               heads_ckpt: Optional[str] = None, seed: int = 0) -> Tuple[DenseHead, dict]:
    """Instantiate head `name` on `visual`'s weights; `params` override the method's preset.

    Returns the head and a dict describing its weights source (for the manifest).
    """
    merged = head_defaults(name)
    unknown = set(params or {}) - set(merged)
    if unknown:
        raise ClipfuseError(f"head {name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                            f"it takes: {', '.join(merged)}")
    merged.update(params or {})
    if name == "clip-dinoiser":
        conv_heads, source = load_dinoiser_heads(heads_ckpt, visual.conv1.out_channels, seed)
        return ClipDinoiserHead(visual, grid, conv_heads, **merged), {"heads_checkpoint": source}
    if merged["attn"] not in ATTENTION_FORMS:
        raise ClipfuseError(f"attention form {merged['attn']!r} not in {', '.join(ATTENTION_FORMS)}")
    return SelfCorrelationHead(visual, grid, **merged), {}
