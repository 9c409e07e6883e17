"""Analytic FLOP count of one fused graph call, per image, by component.

Counts the dense products (matmuls and convolutions), one multiply-add = 2 FLOPs. Element-wise
work (normalisation, LayerNorm, softmax, GELU, residual adds, thresholds) is left out: it is
memory-bound rather than compute-bound and below 1% of the total for ViT-B/16.

Notation (docs/methods.md#common-ground): width D, MLP width M, heads H, patch p, embed E, S x S input,
N = (S/p)^2 patches, T = N + 1 tokens, R = class-name rows of the classifier.

  patch embed          2 N (3 p^2) D
  unchanged block      2 T (3D^2 + D^2 + 2 D M) + 2 * 2 T^2 D      (qkv, out, MLP; QK^T, AV)
  head's last block    value/qkv projections + its attention form + out_proj [+ MLP]
                         identity (MaskCLIP): only V is needed, no T x T products
                         qq or kk: one T x T logit product + AV;  qq+kk (SCLIP): two + AV
  ln_post @ proj       2 N D E
  CLIP-DINOiser        obj_proj 3x3 conv 2 N (9 D) C, correlation 2 N^2 C, pooling 2 E N^2,
                       background 1x1 conv 2 N D        (C = 256 correlation channels)
  RCS (NACLIP + ResCLIP) the same products as NACLIP: the mean of four blocks' attention maps
                       and the tau/lambda mix are element-wise. Its cost is not in FLOPs: blocks 5..8
                       must materialise their H x T x T probabilities, which stops TensorRT's fused
                       MHA kernel there (measure with `clipfuse bench`).
  classifier           2 N E R
  SC-CLIP              the last block's attention runs twice on the N patch tokens (main and multi-level
                       pass; k,v needed, the graph's packed in_proj also computes q), each 2 N D (2D|3D)
                       + 2 * 2 N^2 D + 2 N D^2, no MLP; similarity work 2 N^2 D each for the LOF Gram
                       matrix, S8, S3, W8 X and W3 X (twice) = 12 N^2 D; two depthwise 3x3 neighbour
                       sums (features and inlier counts) 2 * 2 * 9 N (D + 1)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

from clipfuse.runtime.methods import CLIP_DINOISER, RCS, SC_CLIP, get_method

DINOISER_CHANNELS = 256
# The self-correlation family's attention forms -> number of T x T logit products.
LOGIT_PRODUCTS = {"identity": 0, "qk": 1, "qq": 1, "kk": 1, "qq+kk": 2}


@dataclass(frozen=True)
class VitShape:
    width: int
    layers: int
    heads: int
    patch: int
    mlp_width: int
    embed_dim: int

    @classmethod
    def from_visual(cls, visual) -> "VitShape":
        """Read the shape off an open_clip VisionTransformer (what was actually built)."""
        block = visual.transformer.resblocks[0]
        return cls(width=int(visual.conv1.out_channels), layers=len(visual.transformer.resblocks),
                   heads=int(block.attn.num_heads), patch=int(visual.conv1.kernel_size[0]),
                   mlp_width=int(block.mlp.c_fc.out_features), embed_dim=int(visual.proj.shape[1]))

    @classmethod
    def from_config(cls, model: str) -> "VitShape":
        """From open_clip's model config (clipfuse's test configs registered), no weights built."""
        from clipfuse.export.weights import _check_model_name, _open_clip
        cfg = _check_model_name(_open_clip(), model)
        vis = cfg["vision_cfg"]
        width = int(vis["width"])
        return cls(width=width, layers=int(vis["layers"]), heads=width // int(vis.get("head_width", 64)),
                   patch=int(vis["patch_size"]), mlp_width=int(width * float(vis.get("mlp_ratio", 4.0))),
                   embed_dim=int(cfg["embed_dim"]))

    def to_dict(self) -> dict:
        return asdict(self)


def default_head_params(head: str) -> dict:
    return get_method(head).default_head_params()


def _block(t: int, d: int, m: int, logit_products: int, value_only: bool, ffn: bool) -> Dict[str, int]:
    """One transformer block's dense products; `value_only`: V projection only, no attention."""
    out = {"qkv": 2 * t * d * (d if value_only else 3 * d),
           "attention": 0 if value_only else 2 * t * t * d * (logit_products + 1),
           "out_proj": 2 * t * d * d}
    out["mlp"] = 2 * 2 * t * d * m if ffn else 0
    return out


def head_flops(head: str, shape: VitShape, size: int, num_names: int, params: Optional[dict] = None,
               as_exported: bool = False) -> Dict[str, int]:
    """FLOPs per image of one `head` graph call at `size` x `size`, by component (+ "total").

    `params`: the head's parameters (manifest["head"]["params"]); default: the method's preset.
    `as_exported`: count what clipfuse's fused graph computes rather than what the method needs
    (the graph's packed in_proj also computes Q and K for MaskCLIP's value path).
    """
    if size % shape.patch:
        raise ValueError(f"size {size} is not a multiple of the patch size {shape.patch}")
    params = dict(default_head_params(head) if params is None else params)
    d, m, e = shape.width, shape.mlp_width, shape.embed_dim
    n = (size // shape.patch) ** 2
    t = n + 1
    plain = sum(_block(t, d, m, 1, False, True).values())
    out = {"patch_embed": 2 * n * 3 * shape.patch ** 2 * d,
           "trunk_blocks": (shape.layers - 1) * plain}
    if get_method(head).head_family == SC_CLIP:
        out.update(_scclip_flops(n, d, as_exported))
        out["projection"] = 2 * n * d * e
        out["classifier"] = 2 * n * e * num_names
        out["total"] = sum(out.values())
        return out
    dinoiser = get_method(head).head_family == CLIP_DINOISER
    if dinoiser:                   # MaskCLIP's value path feeds the correlation pooling
        form, ffn = "identity", True
    elif get_method(head).head_family == RCS:   # NACLIP's last block; the mix is element-wise
        form, ffn = "kk", False
    else:
        form, ffn = params["attn"], bool(params["ffn"])
    value_only = form == "identity"
    last = _block(t, d, m, LOGIT_PRODUCTS[form], value_only and not as_exported, ffn)
    if value_only and as_exported:
        last["attention"] = 0
    out["last_block"] = sum(last.values())
    out["projection"] = 2 * n * d * e
    if dinoiser:
        c = DINOISER_CHANNELS
        out["dinoiser_heads"] = 2 * n * 9 * d * c + 2 * n * d
        out["correlation"] = 2 * n * n * c
        out["pooling"] = 2 * e * n * n
    out["classifier"] = 2 * n * e * num_names
    out["total"] = sum(out.values())
    return out


def _scclip_flops(n: int, d: int, as_exported: bool) -> Dict[str, int]:
    """SC-CLIP's replaced last block on N patch tokens: two passes of its attention + similarities."""
    one_pass = 2 * n * d * (3 * d if as_exported else 2 * d) + 2 * 2 * n * n * d + 2 * n * d * d
    return {"last_block": 2 * one_pass,
            "similarities": 12 * n * n * d + 2 * 2 * 9 * n * (d + 1)}    # + the inlier-count conv


def flops_per_image(head: str, shape: VitShape, size: int, num_names: int, params: Optional[dict] = None) -> int:
    return head_flops(head, shape, size, num_names, params)["total"]
