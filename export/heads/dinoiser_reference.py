"""Reference of CLIP-DINOiser, as its public code computes it: MaskCLIP features, the correlation
of obj_proj over block L-3's ln_2 output (a forward hook), einsum pooling, the background rule on
probabilities. Shares no code with the fused head."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def scores(ref, images: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> probabilities per class [B, K, h, w]."""
    def guide_hook(blocks, captured):
        return [blocks[len(blocks) - 3].ln_2.register_forward_hook(
            lambda m, a, out: captured.__setitem__("guide", out))]

    captured = ref._tokens(images, guide_hook)
    x, guide = captured["x"], captured["guide"]
    # CLIP-DINOiser, as its public code: MaskCLIP features, correlation from obj_proj, pooling
    clip_feats = ref._last_block(x, "identity", True, True)
    b = clip_feats.shape[0]
    h, w = ref.grid
    g = guide[:, 1:].permute(0, 2, 1).reshape(b, -1, h, w)
    proj = ref.conv_heads.obj_proj(g)
    proj = proj / proj.norm(dim=1, keepdim=True)
    corrs = torch.einsum("bcij,bckl->bijkl", proj, proj).reshape(b, h * w, h, w)
    corrs[corrs < 0.2] = 0.0
    pooled = torch.einsum("bnij,bcij->bcn", corrs, clip_feats)
    pooled = pooled / (corrs.sum(dim=(-1, -2)).unsqueeze(1) + 1e-6)
    pooled = pooled.reshape(b, -1, h, w)
    probs = F.softmax(100.0 * ref._cosine_per_name(pooled), dim=1)
    probs = ref._max_over_synonyms(probs)
    if ref.background_rule:
        bkg = torch.sigmoid(ref.conv_heads.bkg_decoder(F.normalize(g, dim=1)))
        fg = bkg > 0.5
        low = probs.max(dim=1, keepdim=True).values < 0.99
        probs[:, :1][low & ~fg] = 1.0
    return probs

