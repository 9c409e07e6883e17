"""Batched class-name embeddings: the context cut to the longest prompt of each batch gives the
numbers of open_clip's own padded encode_text (an independent reference computed here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipfuse.export.text_embed import encode_names, encode_prompts
from clipfuse.runtime.templates import fill, get_templates


def _perturbed_text_tower(tiny_clip):
    import copy
    model = copy.deepcopy(tiny_clip.model).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("visual") and (name.endswith("bias") or "ln" in name):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def test_cut_context_equals_padded_encode_text(tiny_clip):
    import open_clip
    model = _perturbed_text_tower(tiny_clip)
    tokenizer = open_clip.get_tokenizer(tiny_clip.model_name)
    names = ["cat", "a very long class name with many many words in it", "dog"]
    templates = get_templates("imagenet80")
    prompts = [p for n in names for p in fill(tuple(templates), n)]
    with torch.no_grad():
        want = F.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1)
    # small batches: several cut lengths, and the sort must be undone
    got = encode_prompts(model, tokenizer, prompts, batch_size=37)
    assert torch.allclose(got, want, atol=2e-6), (got - want).abs().max()
    padded = encode_prompts(model, tokenizer, prompts, batch_size=37, truncate=False)
    assert torch.allclose(padded, want, atol=2e-6)
    # the tower is unchanged afterwards (context restored)
    assert model.positional_embedding.shape[0] == 77 and model.attn_mask.shape == (77, 77)
    per_name = encode_names(model, tokenizer, names, templates, batch_size=64)
    ref = F.normalize(want.reshape(3, len(templates), -1).mean(1), dim=-1)
    assert torch.allclose(per_name, ref, atol=2e-6)
    assert not per_name.is_inference()
