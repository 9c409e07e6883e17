"""Reference of the self-correlation family (MaskCLIP, SCLIP, ClearCLIP, NACLIP), as their
public code computes it: the unmodified tower observed by a hook, the last block rewritten in
their sequence-first style (export/reference.py `_last_block`). Shares no code with the fused head."""
from __future__ import annotations

import torch


def scores(ref, images: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> cosine scores per class [B, K, h, w]."""
    p = ref.params
    feats = ref._last_block(ref._tokens(images)["x"], p["attn"], p["residual"], p["ffn"])
    return ref._max_over_synonyms(ref._cosine_per_name(feats))
