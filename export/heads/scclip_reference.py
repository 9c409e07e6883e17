"""Reference of SC-CLIP, as its public code computes it (docs/methods.md#sc-clip): one window
at a time, every block output seen by hooks, LOF with difference norms, torch.quantile and index
lists, the outlier fix by a Python loop over neighbours. Shares no code with the fused head."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F


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


@torch.no_grad()
def scores(ref, images: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> cosine scores per class [B, K, h, w]; the public code runs
    windows one by one (batch 1)."""
    feats = torch.cat([window_features(ref, images[i:i + 1]) for i in range(images.shape[0])])
    return ref._max_over_synonyms(ref._cosine_per_name(feats))


@torch.no_grad()
def window_features(ref, image: torch.Tensor) -> torch.Tensor:
    """One window [1, 3, H, W] -> features [1, E, h, w]; every block output seen by hooks."""
    p = ref.params
    blocks = ref.visual.transformer.resblocks
    outs: List[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: outs.append(out)) for b in blocks]
    try:
        ref.visual(image)
    finally:
        for h in hooks:
            h.remove()
    f = [o[0] for o in outs]                       # [1+N, D] each (batch first tower, B=1)
    h, w = ref.grid
    last_in = len(blocks) - 2
    ids = _scclip_lof_outliers(f[last_in][1:], p["lof_k"], p["lof_quantile"])
    ref.last_outliers = ids
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
    feats = ref.visual.ln_post(x + y) @ ref.visual.proj
    return feats.T.reshape(1, -1, h, w)
