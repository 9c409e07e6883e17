"""Reference of ResCLIP's RCS on NACLIP, as ResCLIP's public code computes it: the query inputs of
the tapped blocks' attention captured by hooks, their attention recomputed in the sequence-first bmm
style, mixed with NACLIP's kk attention. Shares no code with the fused head."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F


@torch.no_grad()
def scores(ref, images: torch.Tensor) -> torch.Tensor:
    """Normalised images [B, 3, H, W] -> cosine scores per class [B, K, h, w]."""
    blocks_of = ref.params["attention_blocks"]

    def attention_inputs(blocks, captured):
        # the query input of each tapped block's attention (ln_1 output); probabilities below
        return [blocks[i].attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: captured.__setitem__(("attn_in", i), a[0] if a else kw["query"]),
            with_kwargs=True) for i in blocks_of]

    captured = ref._tokens(images, attention_inputs)
    feats = rcs_features(ref, captured["x"], [captured[("attn_in", i)] for i in blocks_of])
    return ref._max_over_synonyms(ref._cosine_per_name(feats))


def rcs_features(ref, x: torch.Tensor, attn_inputs: List[torch.Tensor]) -> torch.Tensor:
    """ResCLIP's RCS pass (docs/methods.md#resclip-rcs) in its sequence-first bmm style."""
    blocks = ref.visual.transformer.resblocks
    batch_first = getattr(ref.visual.transformer, "batch_first", True)

    def heads_of(t, n, bsz, hd):                   # [T, B, n*hd] -> [B*n, T, hd]
        return t.contiguous().view(-1, bsz * n, hd).transpose(0, 1)

    acc = None
    for i, y in zip(ref.params["attention_blocks"], attn_inputs):
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
    attn_s = F.softmax(logits if ref.bias is None else logits + ref.bias, dim=-1)
    lam, tau = ref.params["lam"], ref.params["tau"]
    mixed = tau * ((1 - lam) * attn_s + lam * attn_c)
    out = torch.bmm(mixed, v).transpose(0, 1).contiguous().view(-1, bsz, d)
    z = layer.out_proj(out).permute(1, 0, 2)
    feats = ref.visual.ln_post(z[:, 1:]) @ ref.visual.proj
    b, _, e = feats.shape
    return feats.permute(0, 2, 1).reshape(b, e, *ref.grid)
