"""Analytic FLOP count of one fused graph call, per image, by component.

Counts the dense products (matmuls and convolutions), one multiply-add = 2 FLOPs. Element-wise
work (normalisation, LayerNorm, softmax, GELU, residual adds, thresholds) is left out: it is
memory-bound rather than compute-bound and below 1% of the total for ViT-B/16.

Notation (docs/methods.md#common-ground): width D, MLP width M, heads H, patch p, embed E, S x S input,
N = (S/p)^2 patches, T = N + 1 tokens, R = class-name rows of the classifier.

  patch embed          2 N (3 p^2) D
  unchanged block      2 T (3D^2 + D^2 + 2 D M) + 2 * 2 T^2 D      (qkv, out, MLP; QK^T, AV)
  head                 the family's own count: `flops` of its module in clipfuse.export.heads
                       (the replaced last block and the head's extra modules)
  ln_post @ proj       2 N D E
  classifier           2 N E R
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

from clipfuse.runtime.methods import get_method


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


def head_flops(head: str, shape: VitShape, size: int, num_names: int, params: Optional[dict] = None,
               as_exported: bool = False) -> Dict[str, int]:
    """FLOPs per image of one `head` graph call at `size` x `size`, by component (+ "total").

    `params`: the head's parameters (the manifest's head.params); default: the method's preset.
    `as_exported`: count what clipfuse's fused graph computes rather than what the method needs
    (the graph's packed in_proj also computes Q and K for MaskCLIP's value path).
    """
    if size % shape.patch:
        raise ValueError(f"size {size} is not a multiple of the patch size {shape.patch}")
    from clipfuse.export.heads import family_of, typed_params    # torch: only when counting
    from clipfuse.export.heads.base import block_flops

    params = dict(default_head_params(head) if params is None else params)
    family = family_of(head)
    d, m, e = shape.width, shape.mlp_width, shape.embed_dim
    n = (size // shape.patch) ** 2
    t = n + 1
    plain = sum(block_flops(t, d, m, 1, False, True).values())
    out = {"patch_embed": 2 * n * 3 * shape.patch ** 2 * d,
           "trunk_blocks": (shape.layers - 1) * plain}
    out.update(family.flops(shape, n, typed_params(family, params), as_exported))
    out["projection"] = 2 * n * d * e
    out["classifier"] = 2 * n * e * num_names
    out["total"] = sum(out.values())
    return out


def flops_per_image(head: str, shape: VitShape, size: int, num_names: int, params: Optional[dict] = None) -> int:
    return head_flops(head, shape, size, num_names, params)["total"]
