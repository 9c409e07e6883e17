"""Cosine classifier against baked (or fed) L2-normalised class-name embeddings, and the
synonym reduction (several names of one class -> max over its names)."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


def cosine_scores(features: torch.Tensor, name_embeddings: torch.Tensor) -> torch.Tensor:
    """l2n(F) . T^T: [B, E, h, w] x [N, E] -> [B, N, h, w] (T rows already L2-normalised)."""
    b, e, h, w = features.shape
    feats = F.normalize(features, dim=1).flatten(2)                  # [B, E, N]
    # a plain MatMul: TensorRT's Einsum support is partial, MatMul is universal
    return torch.matmul(name_embeddings, feats).reshape(b, -1, h, w)


def synonym_index(class_of_name: List[int]) -> Optional[torch.Tensor]:
    """[K, S] indices of each class's names, padded with its first name; None if no synonyms."""
    n_classes = max(class_of_name) + 1
    groups: List[List[int]] = [[] for _ in range(n_classes)]
    for name_idx, cls in enumerate(class_of_name):
        groups[cls].append(name_idx)
    width = max(len(g) for g in groups)
    if width == 1:
        return None
    return torch.tensor([g + [g[0]] * (width - len(g)) for g in groups], dtype=torch.long)


class CosineClassifier(nn.Module):
    """Baked vocabulary: `name_embeddings` [N, E] is an initializer of the graph."""

    def __init__(self, name_embeddings: Optional[torch.Tensor], class_of_name: Optional[List[int]]) -> None:
        super().__init__()
        self.register_buffer("name_embeddings", name_embeddings)
        index = synonym_index(class_of_name) if class_of_name else None
        self.register_buffer("synonyms", index, persistent=False)

    def forward(self, features: torch.Tensor, fed_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        table = self.name_embeddings if fed_embeddings is None else fed_embeddings
        return cosine_scores(features, table)

    def reduce_synonyms(self, scores: torch.Tensor) -> torch.Tensor:
        if self.synonyms is None:
            return scores
        k, s = self.synonyms.shape
        gathered = scores[:, self.synonyms.flatten()]          # [B, K*S, h, w]
        b, _, h, w = gathered.shape
        return gathered.reshape(b, k, s, h, w).max(dim=2).values
