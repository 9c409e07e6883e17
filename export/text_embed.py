"""Class-name embeddings in torch: fill templates, encode_text, l2n each, average, l2n again.

All prompts (classes x templates) go through the text tower in a few large batches under
torch.inference_mode. CLIP's text tower is causal and reads its embedding at the end-of-text token,
so the positions after a prompt's last token never influence it: each batch runs with the context
cut to its longest prompt (prompts sorted by length, so batches are homogeneous). The 80 ImageNet
templates fill 10-25 of the 77 positions, so this is a 3-5x smaller computation than the padded
one, with the same numbers (tests/test_text_embed.py compares both).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipfuse.runtime.templates import fill


def _can_truncate(model: torch.nn.Module) -> bool:
    """A causal open_clip text tower pooled at the EOT token (argmax/eos): the cut is exact."""
    return (getattr(model, "text_pool_type", None) in ("argmax", "eos")
            and isinstance(getattr(model, "positional_embedding", None), torch.Tensor)
            and isinstance(getattr(model, "attn_mask", None), torch.Tensor))


@contextlib.contextmanager
def _context_cut(model: torch.nn.Module, length: int) -> Iterator[None]:
    """Temporarily give the text tower a context of `length` positions (embedding and mask cut)."""
    pos, mask = model.positional_embedding, model.attn_mask
    try:
        model.positional_embedding = torch.nn.Parameter(pos[:length], requires_grad=False)
        model.attn_mask = mask[:length, :length]
        yield
    finally:
        model.positional_embedding = pos
        model.attn_mask = mask


def encode_prompts(model: torch.nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 512,
                   progress: bool = False, truncate: bool = True) -> torch.Tensor:
    """[len(prompts), E] float32, each row L2-normalised."""
    tokens = tokenizer(list(prompts))
    out = torch.empty(0)
    cut = truncate and _can_truncate(model)
    eot = tokens.argmax(dim=-1) if cut else None     # EOT has the largest id in CLIP's vocabulary
    order = torch.argsort(eot, stable=True) if cut else torch.arange(len(prompts))
    chunks = []
    starts = range(0, len(prompts), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="text embeddings", unit="batch", disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            batch = tokens[idx]
            if cut:
                length = int(eot[idx].max()) + 1
                with _context_cut(model, length):
                    feats = model.encode_text(batch[:, :length])
            else:
                feats = model.encode_text(batch)
            chunks.append(F.normalize(feats.float(), dim=-1))
    if chunks:      # outside inference mode: ordinary tensors (they become graph constants)
        out = torch.empty((len(prompts), chunks[0].shape[1]), dtype=torch.float32)
        out[order] = torch.cat(chunks)
    return out


def encode_names(model: torch.nn.Module, tokenizer, names: Sequence[str], templates: Sequence[str],
                 batch_size: int = 512, progress: bool = False, truncate: bool = True) -> torch.Tensor:
    """[len(names), E] float32, each row the L2-normalised mean of its normalised template embeddings."""
    prompts = [p for name in names for p in fill(tuple(templates), name)]
    per_prompt = encode_prompts(model, tokenizer, prompts, batch_size, progress, truncate)
    per_prompt = per_prompt.reshape(len(names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)
