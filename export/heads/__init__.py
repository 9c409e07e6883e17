"""Dense heads by family. What each method is (preset, positional rule, protocol) lives in
clipfuse.runtime.methods (torch-free); this package only turns a MethodSpec into a DenseHead.

A new family: write its DenseHead here and add a builder to FAMILIES.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from torch import nn

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import CLIP_DINOISER, RCS, SC_CLIP, SELF_CORRELATION, MethodSpec, get_method

from .base import DenseHead
from .dinoiser import ClipDinoiserHead, load_dinoiser_heads
from .rcs import RcsHead
from .scclip import ScClipHead
from .selfcorr import ATTENTION_FORMS, SelfCorrelationHead

# (visual, grid, merged params, heads checkpoint, seed) -> (DenseHead, weights description)
HeadBuilder = Callable[[nn.Module, Tuple[int, int], dict, Optional[str], int], Tuple[DenseHead, dict]]


def _build_selfcorr(visual: nn.Module, grid: Tuple[int, int], params: dict, heads_checkpoint: Optional[str],
                    seed: int) -> Tuple[DenseHead, dict]:
    if params["attn"] not in ATTENTION_FORMS:
        raise ClipfuseError(f"attention form {params['attn']!r} not in {', '.join(ATTENTION_FORMS)}")
    return SelfCorrelationHead(visual, grid, **params), {}


def _build_dinoiser(visual: nn.Module, grid: Tuple[int, int], params: dict, heads_checkpoint: Optional[str],
                    seed: int) -> Tuple[DenseHead, dict]:
    conv_heads, source = load_dinoiser_heads(heads_checkpoint, visual.conv1.out_channels, seed)
    return ClipDinoiserHead(visual, grid, conv_heads, **params), {"heads_checkpoint": source}


def _build_rcs(visual: nn.Module, grid: Tuple[int, int], params: dict, heads_checkpoint: Optional[str],
               seed: int) -> Tuple[DenseHead, dict]:
    try:
        return RcsHead(visual, grid, **params), {}
    except ValueError as exc:
        raise ClipfuseError(str(exc)) from None


FAMILIES: Dict[str, HeadBuilder] = {SELF_CORRELATION: _build_selfcorr, CLIP_DINOISER: _build_dinoiser}
FAMILIES[RCS] = _build_rcs


def _build_scclip(visual: nn.Module, grid: Tuple[int, int], params: dict, heads_checkpoint: Optional[str],
                  seed: int) -> Tuple[DenseHead, dict]:
    try:
        return ScClipHead(visual, grid, **params), {}
    except ValueError as exc:
        raise ClipfuseError(f"sc-clip: {exc}") from None


FAMILIES[SC_CLIP] = _build_scclip


def merged_head_params(method: MethodSpec, params: Optional[dict] = None) -> dict:
    """The method's preset with `params` applied; unknown names are a ClipfuseError."""
    merged = method.default_head_params()
    unknown = set(params or {}) - set(merged)
    if unknown:
        raise ClipfuseError(f"head {method.name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                            f"it takes: {', '.join(merged)}")
    merged.update(params or {})
    return merged


def build_dense_head(method: str, visual: nn.Module, grid: Tuple[int, int], params: Optional[dict] = None,
                     heads_checkpoint: Optional[str] = None, seed: int = 0) -> Tuple[DenseHead, dict]:
    """Instantiate `method`'s DenseHead on `visual`'s weights; `params` override the method's preset.

    Returns the head and a dict describing its weights source (for the manifest).
    """
    spec = get_method(method)
    return FAMILIES[spec.head_family](visual, grid, merged_head_params(spec, params), heads_checkpoint, seed)
