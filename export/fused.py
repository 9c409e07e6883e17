"""The fused graph: uint8 pixels -> ViT with the head's last block -> cosine classifier -> scores."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .classifier import CosineClassifier
from .heads.base import DenseHead
from .trunk import VisionTrunk


class FusedSegmenter(nn.Module):
    """image uint8 [B, H, W, 3] (+ class_embeddings [K, E] when the vocabulary is dynamic)
    -> scores float32 [B, K, H/p, W/p] with the head's semantics (cosine or probability)."""

    def __init__(self, trunk: VisionTrunk, head: DenseHead, classifier: CosineClassifier) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.classifier = classifier

    def forward(self, image: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        feats, extras = self.head.features(self.trunk(image))
        scores = self.head.name_scores(self.classifier(feats, class_embeddings))
        if class_embeddings is None:
            scores = self.classifier.reduce_synonyms(scores)
        return self.head.finalize(scores, extras)
