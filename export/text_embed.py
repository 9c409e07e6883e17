"""Class-name embeddings in torch: fill templates, encode_text, l2n each, average, l2n again."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipfuse.runtime.templates import fill


@torch.no_grad()
def encode_names(model: torch.nn.Module, tokenizer, names: Sequence[str], templates: Sequence[str],
                 batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """[len(names), E] float32, each row the L2-normalised mean of its normalised template embeddings."""
    prompts = [p for name in names for p in fill(tuple(templates), name)]
    chunks = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="text embeddings", unit="batch", disable=not progress, leave=False):
        tokens = tokenizer(prompts[start:start + batch_size])
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(chunks).reshape(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)
