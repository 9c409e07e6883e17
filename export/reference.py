"""PyTorch references of every head, written independently of the fused module.

They run the UNMODIFIED open_clip model the way each method's public code does: the positional
table is swapped on a copy of the tower, forward hooks capture the tokens entering the last block
(and what a family reads besides), and the modified last block is computed with the methods' own
style of code (sequence-first bmm attention, scale applied after the product, einsum pooling).
The fused module and the ONNX graphs are tested against these.

`ReferenceModel` holds what every family's reference shares (the observed tower, the
self-correlation last block, cosine scores, the synonym max); each family's own part is
`scores(ref, images)` in export/heads/NAME_reference.py, named by its HeadFamily.
"""
from __future__ import annotations

import copy
import importlib
from types import ModuleType
from typing import Any, Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from clipfuse.runtime.methods import get_method
from clipfuse.runtime.vocab import class_of_name

from .trunk import CLIP_MEAN, CLIP_STD


def _pos_table(visual, grid, rule: str) -> torch.Tensor:
    pos = visual.positional_embedding.detach()
    n = int(round((pos.shape[0] - 1) ** 0.5))
    h, w = grid
    if (h, w) == (n, n):
        return pos
    patch = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    if rule == "size":    # MaskCLIP / CLIP-DINOiser
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", align_corners=False)
    else:                 # SCLIP family, DINO's interpolate_pos_encoding
        w0, h0 = w + 0.1, h + 0.1
        patch = F.interpolate(patch, scale_factor=(h0 / n, w0 / n), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(h * w, -1)])


def _custom_attn(attn_layer, x: torch.Tensor, form: str, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """SCLIP/ClearCLIP/NACLIP-style attention on sequence-first x [T, B, D]."""
    num_heads = attn_layer.num_heads
    tgt_len, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim ** -0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    if form == "identity":
        out = v
    else:
        def attn_of(a, b):
            logits = torch.bmm(a, b.transpose(1, 2)) * scale
            if bias is not None:
                logits = logits + bias
            return F.softmax(logits, dim=-1)
        if form == "qq+kk":
            weights = attn_of(q, q) + attn_of(k, k)
        else:
            a, b = {"qk": (q, k), "qq": (q, q), "kk": (k, k)}[form]
            weights = attn_of(a, b)
        out = torch.bmm(weights, v)
    out = out.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(out)


def _naclip_gaussian(grid, sigma: float) -> torch.Tensor:
    h, w = grid
    pts = [(i, j) for i in range(h) for j in range(w)]
    g = torch.zeros(h * w + 1, h * w + 1, dtype=torch.float64)
    for a, (ia, ja) in enumerate(pts):
        for b, (ib, jb) in enumerate(pts):
            g[a + 1, b + 1] = np.exp(-((ia - ib) ** 2 + (ja - jb) ** 2) / (2 * sigma ** 2))
    return g.float()


def _family_reference(family: str) -> ModuleType:
    """The family's reference module (`scores(ref, images)`), named by its HeadFamily."""
    from .heads import FAMILIES
    return importlib.import_module(FAMILIES[family].reference)


class ReferenceModel:
    """Callable: uint8 NHWC numpy batch -> float32 numpy scores [B, K, h, w] (graph semantics)."""

    def __init__(self, clip, method: str, head_params: dict, vocabulary: List[List[str]],
                 name_embeddings: torch.Tensor, size: int, pos_rule: str, conv_heads=None,
                 background_rule: bool = False) -> None:
        self.visual = copy.deepcopy(clip.model.visual).eval()
        self.method = method
        self.family = get_method(method).head_family
        self.family_reference = _family_reference(self.family)
        self.params = dict(head_params)
        self.vocabulary = vocabulary
        self.text = name_embeddings.float()
        self.class_of_name = class_of_name(vocabulary)
        patch = self.visual.conv1.kernel_size[0]
        self.grid = (size // patch, size // patch)
        self.visual.positional_embedding = torch.nn.Parameter(_pos_table(self.visual, self.grid, pos_rule),
                                                              requires_grad=False)
        self.conv_heads = conv_heads
        self.background_rule = background_rule
        sigma = self.params.get("gaussian_sigma")
        self.bias = _naclip_gaussian(self.grid, sigma) if sigma else None

    # --- the unmodified tower, observed through hooks -------------------------------------------
    @torch.no_grad()
    def _tokens(self, images: torch.Tensor, hooks: Callable[[Any, dict], list] = lambda blocks, captured: []):
        """Run the tower; returns what the hooks captured, with "x" = the tokens entering the last
        block. `hooks(blocks, captured)` registers a family's own hooks and returns their handles."""
        captured = {}
        blocks = self.visual.transformer.resblocks
        handles = [blocks[-1].register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))]
        handles += hooks(blocks, captured)
        try:
            self.visual(images)
        finally:
            for h in handles:
                h.remove()
        return captured

    def _last_block(self, x: torch.Tensor, form: str, residual: bool, ffn: bool) -> torch.Tensor:
        blk = self.visual.transformer.resblocks[-1]
        xs = x.permute(1, 0, 2)                                   # [T, B, D], as the methods' code
        a = _custom_attn(blk.attn, blk.ln_1(xs), form, self.bias)
        z = xs + a if residual else a
        if ffn:
            z = z + blk.mlp(blk.ln_2(z))
        z = z.permute(1, 0, 2)
        feats = self.visual.ln_post(z[:, 1:]) @ self.visual.proj   # [B, N, E]
        b, n, e = feats.shape
        return feats.permute(0, 2, 1).reshape(b, e, *self.grid)

    def _cosine_per_name(self, feats: torch.Tensor) -> torch.Tensor:
        feats = feats / feats.norm(dim=1, keepdim=True)
        return torch.einsum("bchw,kc->bkhw", feats, self.text)

    def _max_over_synonyms(self, scores: torch.Tensor) -> torch.Tensor:
        n_cls = len(self.vocabulary)
        out = []
        for c in range(n_cls):
            idx = [i for i, k in enumerate(self.class_of_name) if k == c]
            out.append(scores[:, idx].max(dim=1).values)
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def scores(self, images_uint8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        images = (images_uint8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        return self.family_reference.scores(self, images)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.scores(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_build(cls, build) -> "ReferenceModel":
        """Same weights and vocabulary as an in-process FusedBuild (clipfuse.export.api)."""
        conv_heads = getattr(build.module.head, "heads", None)
        background = bool(build.head_params.get("background_rule", False))
        return cls(build.clip, build.method, build.head_params, build.vocabulary, build.name_embeddings,
                   build.size, get_method(build.method).pos_rule, conv_heads=conv_heads,
                   background_rule=background)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ReferenceModel":
        """Rebuild the exported model (same tag/file/seed) from its manifest."""
        from dataclasses import replace

        from .api import build_fused
        from .spec import ImageExportSpec
        return cls.from_build(build_fused(replace(ImageExportSpec.from_manifest(manifest), vocab_mode="baked")))
