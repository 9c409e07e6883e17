"""What every dense head shares: the last block's weights and the patch projection."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn


class DenseHead(nn.Module):
    """Replaces the last ViT block; maps the tokens entering it to features F [B, E, h, w].

    Subclasses implement `features`. `name_scores`/`finalize` let a head change how cosine
    similarities become the graph's scores (CLIP-DINOiser turns them into probabilities).
    """

    score_type = "cosine"
    # Index of the block whose ln_2 output the head reads (None: none needed).
    guide_block: Optional[int] = None
    # Blocks whose outputs the head reads besides the last block's input (SC-CLIP); the trunk
    # then passes them as `guide` = {block index: tokens [B, 1+N, D]}.
    tap_blocks: Tuple[int, ...] = ()
    # Blocks whose mean attention probabilities [B, heads, T, T] the head reads as its guide (RCS).
    attention_blocks: Tuple[int, ...] = ()

    def __init__(self, visual: nn.Module, grid: Tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.block = visual.transformer.resblocks[-1]
        self.ln_post = visual.ln_post
        self.proj = visual.proj

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post over patch tokens, @ proj, as [B, E, h, w] (not normalised)."""
        feats = self.ln_post(x[:, 1:]) @ self.proj
        b, _, e = feats.shape
        return feats.transpose(1, 2).reshape(b, e, *self.grid)

    def features(self, x: torch.Tensor, guide: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def name_scores(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine

    def finalize(self, scores: torch.Tensor, extras: Dict[str, torch.Tensor]) -> torch.Tensor:
        return scores

    def params(self) -> dict:
        return {}
