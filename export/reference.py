"""PyTorch references of every head, written independently of the fused module.

They run the UNMODIFIED open_clip model the way each method's public code does: the positional
table is swapped on a copy of the tower, forward hooks capture the tokens entering the last block
(and CLIP-DINOiser's block L-3 ln_2 output), and the modified last block is computed with the
methods' own style of code (sequence-first bmm attention, scale applied after the product, einsum
pooling). The fused module and the ONNX graphs are tested against these.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from clipfuse.runtime.methods import CLIP_DINOISER, RCS, SC_CLIP, get_method
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


# --- SC-CLIP, as its public code computes it (docs/methods.md#sc-clip), one window at a time ---
def _scclip_lof_outliers(p: torch.Tensor, k: int, quantile: float) -> torch.Tensor:
    """Flat ids of the LOF outliers of p [N, D] (difference norms, quantile, where)."""
    dist = torch.norm(p.unsqueeze(1) - p.unsqueeze(0), dim=-1) ** 2
    knn_d, knn_i = torch.topk(dist, k + 1, dim=-1, largest=False)
    knn_d, knn_i = knn_d[:, 1:], knn_i[:, 1:]
    kdist = knn_d[:, -1]
    reach = torch.max(knn_d, kdist.unsqueeze(1).expand_as(knn_d))
    lrd = 1.0 / (reach.mean(dim=1))
    lof = torch.nan_to_num(lrd[knn_i].mean(dim=1) / lrd)
    thr = torch.quantile(lof.float(), quantile)
    return torch.where(lof > thr)[0]


def _scclip_fix(feats: torch.Tensor, ids: torch.Tensor, w: int) -> torch.Tensor:
    """feats [h, w, D]; each listed outlier with inlier 8-neighbours takes their mean."""
    h = feats.shape[0]
    cells = [(int(i) // w, int(i) % w) for i in ids]
    bad = torch.zeros(h, w, dtype=torch.bool)
    for r, c in cells:
        bad[r, c] = True
    out = feats.clone()
    for r, c in cells:
        nbrs = [feats[rr, cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                if (rr, cc) != (r, c) and 0 <= rr < h and 0 <= cc < w and not bad[rr, cc]]
        if nbrs:
            out[r, c] = torch.stack(nbrs).mean(0)
    return out


def _scclip_adjust(s: torch.Tensor, beta: float) -> torch.Tensor:
    s = s.clone()
    s[s < beta] = 0
    return s / (s.sum(-1, keepdim=True) + 1e-6)


def _scclip_kkmix(attn_layer, z: torch.Tensor, sim: torch.Tensor, sharpen: float) -> torch.Tensor:
    """z [N, D] sequence-first single window; prior from sim, averaged with softmax(k k^T)."""
    heads = attn_layer.num_heads
    n, d = z.shape
    hd = d // heads
    _, k, v = F.linear(z, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    k = k.reshape(n, heads, hd).transpose(0, 1)
    v = v.reshape(n, heads, hd).transpose(0, 1)
    mid = sharpen * (sim - torch.mean(sim))
    mid[mid < 0] = float("-inf")
    w = 0.5 * F.softmax(mid, dim=-1).unsqueeze(0) + 0.5 * F.softmax(torch.bmm(k, k.transpose(1, 2)) * hd ** -0.5, -1)
    return attn_layer.out_proj(torch.bmm(w, v).transpose(0, 1).reshape(n, d))


class ReferenceModel:
    """Callable: uint8 NHWC numpy batch -> float32 numpy scores [B, K, h, w] (graph semantics)."""

    def __init__(self, clip, method: str, head_params: dict, vocabulary: List[List[str]],
                 name_embeddings: torch.Tensor, size: int, pos_rule: str, conv_heads=None,
                 background_rule: bool = False) -> None:
        self.visual = copy.deepcopy(clip.model.visual).eval()
        self.method = method
        self.family = get_method(method).head_family
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
    def _tokens(self, images: torch.Tensor):
        captured = {}
        blocks = self.visual.transformer.resblocks
        hooks = [blocks[-1].register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))]
        if self.family == CLIP_DINOISER:
            hooks.append(blocks[len(blocks) - 3].ln_2.register_forward_hook(
                lambda m, a, out: captured.__setitem__("guide", out)))
        if self.family == RCS:
            # the query input of each tapped block's attention (ln_1 output); probabilities below
            for i in self.params["attention_blocks"]:
                hooks.append(blocks[i].attn.register_forward_pre_hook(
                    lambda m, a, kw, i=i: captured.__setitem__(("attn_in", i), a[0] if a else kw["query"]),
                    with_kwargs=True))
        try:
            self.visual(images)
        finally:
            for h in hooks:
                h.remove()
        if self.family == RCS:
            return captured["x"], [captured[("attn_in", i)] for i in self.params["attention_blocks"]]
        return captured["x"], captured.get("guide")

    def _rcs(self, x: torch.Tensor, attn_inputs: List[torch.Tensor]) -> torch.Tensor:
        """ResCLIP's RCS pass (docs/methods.md#resclip-rcs) in its sequence-first bmm style."""
        blocks = self.visual.transformer.resblocks
        batch_first = getattr(self.visual.transformer, "batch_first", True)

        def heads_of(t, n, bsz, hd):                   # [T, B, n*hd] -> [B*n, T, hd]
            return t.contiguous().view(-1, bsz * n, hd).transpose(0, 1)

        acc = None
        for i, y in zip(self.params["attention_blocks"], attn_inputs):
            layer = blocks[i].attn
            ys = y.permute(1, 0, 2) if batch_first else y
            n, (_, bsz, d) = layer.num_heads, ys.shape
            q, k, _ = F.linear(ys, layer.in_proj_weight, layer.in_proj_bias).chunk(3, dim=-1)
            probs = F.softmax(torch.bmm(heads_of(q, n, bsz, d // n), heads_of(k, n, bsz, d // n).transpose(1, 2))
                              * (d // n) ** -0.5, dim=-1)
            acc = probs if acc is None else acc + probs
        attn_c = acc / len(attn_inputs)
        blk = blocks[-1]
        layer = blk.attn
        xs = blk.ln_1(x.permute(1, 0, 2))
        n, (_, bsz, d) = layer.num_heads, xs.shape
        _, k, v = F.linear(xs, layer.in_proj_weight, layer.in_proj_bias).chunk(3, dim=-1)
        k, v = heads_of(k, n, bsz, d // n), heads_of(v, n, bsz, d // n)
        logits = torch.bmm(k, k.transpose(1, 2)) * (d // n) ** -0.5
        attn_s = F.softmax(logits if self.bias is None else logits + self.bias, dim=-1)
        lam, tau = self.params["lam"], self.params["tau"]
        mixed = tau * ((1 - lam) * attn_s + lam * attn_c)
        out = torch.bmm(mixed, v).transpose(0, 1).contiguous().view(-1, bsz, d)
        z = layer.out_proj(out).permute(1, 0, 2)
        feats = self.visual.ln_post(z[:, 1:]) @ self.visual.proj
        b, _, e = feats.shape
        return feats.permute(0, 2, 1).reshape(b, e, *self.grid)

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
    def _scclip_feats(self, image: torch.Tensor) -> torch.Tensor:
        """One window [1, 3, H, W] -> features [1, E, h, w]; every block output seen by hooks."""
        p = self.params
        blocks = self.visual.transformer.resblocks
        outs: List[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda m, a, out: outs.append(out)) for b in blocks]
        try:
            self.visual(image)
        finally:
            for h in hooks:
                h.remove()
        f = [o[0] for o in outs]                       # [1+N, D] each (batch first tower, B=1)
        h, w = self.grid
        last_in = len(blocks) - 2
        ids = _scclip_lof_outliers(f[last_in][1:], p["lof_k"], p["lof_quantile"])
        self.last_outliers = ids
        x = _scclip_fix(f[last_in][1:].reshape(h, w, -1), ids, w).reshape(h * w, -1)
        u8 = _scclip_fix(f[p["pre_adjust_block"]][1:].reshape(h, w, -1), ids, w).reshape(h * w, -1)
        u8 = u8 / u8.norm(dim=-1, keepdim=True)
        s8 = u8 @ u8.T
        u3 = f[p["post_adjust_block"]][1:]
        u3 = u3 / u3.norm(dim=-1, keepdim=True)
        w3 = _scclip_adjust(u3 @ u3.T, p["beta"])
        blk = blocks[-1]
        x = _scclip_adjust(s8, p["beta"]) @ x
        x = _scclip_kkmix(blk.attn, blk.ln_1(x), s8, p["attn_sharpen"]) + p["res_cls"] * f[last_in][0]
        x = w3 @ x
        ms = torch.stack(f[p["multi_start"]:p["multi_stop"]]).sum(0)
        y = _scclip_kkmix(blk.attn, blk.ln_1(ms[1:]), s8, p["attn_sharpen"]) + p["res_cls"] * ms[0]
        y = w3 @ y
        feats = self.visual.ln_post(x + y) @ self.visual.proj
        return feats.T.reshape(1, -1, h, w)

    @torch.no_grad()
    def scores(self, images_uint8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        images = (images_uint8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        if self.family == SC_CLIP:    # the public code runs windows one by one (batch 1)
            feats = torch.cat([self._scclip_feats(images[i:i + 1]) for i in range(images.shape[0])])
            return self._max_over_synonyms(self._cosine_per_name(feats))
        x, guide = self._tokens(images)
        if self.family == RCS:
            return self._max_over_synonyms(self._cosine_per_name(self._rcs(x, guide)))
        if self.family != CLIP_DINOISER:
            p = self.params
            feats = self._last_block(x, p["attn"], p["residual"], p["ffn"])
            return self._max_over_synonyms(self._cosine_per_name(feats))
        # CLIP-DINOiser, as its public code: MaskCLIP features, correlation from obj_proj, pooling
        clip_feats = self._last_block(x, "identity", True, True)
        b = clip_feats.shape[0]
        h, w = self.grid
        g = guide[:, 1:].permute(0, 2, 1).reshape(b, -1, h, w)
        proj = self.conv_heads.obj_proj(g)
        proj = proj / proj.norm(dim=1, keepdim=True)
        corrs = torch.einsum("bcij,bckl->bijkl", proj, proj).reshape(b, h * w, h, w)
        corrs[corrs < 0.2] = 0.0
        pooled = torch.einsum("bnij,bcij->bcn", corrs, clip_feats)
        pooled = pooled / (corrs.sum(dim=(-1, -2)).unsqueeze(1) + 1e-6)
        pooled = pooled.reshape(b, -1, h, w)
        probs = F.softmax(100.0 * self._cosine_per_name(pooled), dim=1)
        probs = self._max_over_synonyms(probs)
        if self.background_rule:
            bkg = torch.sigmoid(self.conv_heads.bkg_decoder(F.normalize(g, dim=1)))
            fg = bkg > 0.5
            low = probs.max(dim=1, keepdim=True).values < 0.99
            probs[:, :1][low & ~fg] = 1.0
        return probs

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
