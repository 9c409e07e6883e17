"""Per-backbone protocol data: the one table of what changes when a head runs on another CLIP tower.

runtime/methods.py holds each method's ViT-B/16 protocol (the setting every method publishes).
This table says, per method and backbone, which window/stride the method's public code uses there,
whether the method published results for that backbone, and the head parameters that name blocks
of the tower (SC-CLIP's and RCS's block indices are ViT-B/16's 12 blocks). `protocol_for` and
`head_params_for` are what the exporter and `clipfuse heads` consult; sources (file and commit of
each method's public code) are in docs/backbones.md.

What the public code says, in short: every method here slides a window given in PIXELS
(`slide_crop`/`slide_stride` in NACLIP's naclip.py, SCLIP's clip_segmentor.py, ClearCLIP's
clearclip_segmentor.py; MaskCLIP/CLIP-DINOiser's mmseg test_cfg), and none of them changes it with
the backbone: a patch-14 tower at window 224 sees a 16x16 grid instead of ViT-B/16's 14x14, and a
ViT-B/32 a 7x7 one. The window only has to be a multiple of the patch size, which 224 and 448 are
for patch 14, 16 and 32; a 336-pixel tower (ViT-L/14-336) keeps the method's window (its
positional table is resized like any other export size).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

from .methods import MethodSpec, Protocol, get_method


@dataclass(frozen=True)
class Backbone:
    """The vision tower facts a protocol depends on (open_clip's model configs)."""

    name: str
    patch: int
    image_size: int      # the tower's pretraining resolution
    width: int
    layers: int
    embed_dim: int


BACKBONES: Dict[str, Backbone] = {b.name: b for b in (
    Backbone("ViT-B-32", 32, 224, 768, 12, 512),
    Backbone("ViT-B-16", 16, 224, 768, 12, 512),
    Backbone("ViT-L-14", 14, 224, 1024, 24, 768),
    Backbone("ViT-L-14-336", 14, 336, 1024, 24, 768),
    Backbone("ViT-H-14", 14, 224, 1280, 32, 1024),
)}
REFERENCE_BACKBONE = "ViT-B-16"


@dataclass(frozen=True)
class BackboneSetting:
    """A method on a backbone: published or a stated default, and what differs from ViT-B/16."""

    published: bool
    note: str
    protocol: Dict[str, object] = field(default_factory=dict)    # Protocol field overrides
    head_params: Dict[str, object] = field(default_factory=dict)  # DenseHead parameter overrides


_DEFAULT_NOTE = ("no published setting for this backbone: the method's ViT-B/16 protocol in pixels "
                 "(stated default)")
_SAME_CODE = "public code's window/stride (pixels) are backbone-independent"


def _scaled_blocks(value, layers: int):
    """ViT-B/16 block index (or indices) -> the same relative depth in a `layers`-block tower."""
    if isinstance(value, (tuple, list)):
        return tuple(_scaled_blocks(v, layers) for v in value)
    return int(round(int(value) * layers / 12))


def _depth_params(method: str, layers: int) -> Dict[str, object]:
    """Block-naming parameters at the same relative depth (stated default for deeper towers)."""
    if layers == 12:
        return {}
    if method == "sc-clip":
        p = get_method(method).head_params
        return {k: _scaled_blocks(p[k], layers) for k in ("pre_adjust_block", "post_adjust_block",
                                                          "multi_start", "multi_stop")}
    if method == "rcs":
        start, stop = 5 * layers // 12, 9 * layers // 12          # ViT-B/16: blocks 5..8
        return {"attention_blocks": tuple(range(start, stop))}
    return {}


# A backbone a method's public configs name beyond ViT-B/16 (docs/backbones.md: file and commit).
# Only what was read in the code is listed; papers' tables are not claimed here.
_PUBLISHED: Dict[Tuple[str, str], str] = {
    ("clearclip", "ViT-L-14"): "ClearCLIP's configs/base_config.py names vit_type 'ViT-L-14'; " + _SAME_CODE,
}


def backbone_of(model: str) -> Optional[Backbone]:
    """The table's entry for an open_clip model name (None: not in the table, e.g. the tiny test
    towers; they get the method's ViT-B/16 protocol)."""
    return BACKBONES.get(model)


def setting(method: str, model: str) -> BackboneSetting:
    """What the table says for `method` on `model` (also for backbones outside the table)."""
    get_method(method)
    backbone = backbone_of(model)
    if backbone is None:
        return BackboneSetting(published=False, note="not a tabulated backbone: ViT-B/16 settings")
    if model == REFERENCE_BACKBONE:
        return BackboneSetting(published=True, note="the method's published setting")
    params = _depth_params(method, backbone.layers)
    note = _PUBLISHED.get((method, model))
    if method == "clip-dinoiser":
        note = None   # its trained heads exist for ViT-B/16 only (width 768 conv heads)
        extra = "; trained heads only for ViT-B/16: --heads must match this width"
    else:
        extra = ""
    if params:
        extra += "; block indices at the same relative depth: " + ", ".join(f"{k}={v}" for k, v in params.items())
    if note is not None:
        return BackboneSetting(published=True, note=note + extra, head_params=params)
    return BackboneSetting(published=False, note=_DEFAULT_NOTE + extra, head_params=params)


def protocol_for(method: str, model: str) -> Protocol:
    """The method's protocol on `model` (ViT-B/16's, with the table's overrides)."""
    spec: MethodSpec = get_method(method)
    over = setting(method, model).protocol
    return replace(spec.protocol, **over) if over else spec.protocol


def head_params_for(method: str, model: str) -> Dict[str, object]:
    """The method's DenseHead defaults on `model` (a fresh dict)."""
    params = get_method(method).default_head_params()
    params.update(setting(method, model).head_params)
    return params
