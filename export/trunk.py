"""The unchanged part of the CLIP ViT: uint8 pixels -> tokens entering the last block.

Pixels arrive as uint8 NHWC, the layout decoders produce, and the CLIP normalisation happens in
the graph so every backend and every caller sees the same contract.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import head_scale, merge_heads, qkv, scaled_softmax, standard_attention
from .posembed import interpolate_pos_embed

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def run_block(block: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One unmodified residual block; also returns ln_2 of its mid-point (CLIP-DINOiser's guide)."""
    mid = x + block.ls_1(standard_attention(block.attn, block.ln_1(x)))
    guide = block.ln_2(mid)
    return mid + block.ls_2(block.mlp(guide)), guide


def run_block_with_attention(block: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One unmodified residual block that also returns its attention probabilities [B, heads, T, T].

    Written out (not standard_attention) because the probabilities leave the block: TensorRT's
    fused MHA kernel never materialises them, so these blocks run unfused (the cost RCS pays).
    """
    attn = block.attn
    q, k, v = qkv(attn, block.ln_1(x))
    probs = scaled_softmax(q, k, head_scale(attn))
    mid = x + block.ls_1(attn.out_proj(merge_heads(torch.matmul(probs, v))))
    return mid + block.ls_2(block.mlp(block.ln_2(mid))), probs


class VisionTrunk(nn.Module):
    """conv1 -> CLS + baked positional table -> ln_pre -> blocks 0..L-2 of an open_clip ViT."""

    def __init__(self, visual: nn.Module, size: Tuple[int, int], pos_rule: str,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 guide_block: Optional[int] = None, tap_blocks: Sequence[int] = (),
                 attention_blocks: Sequence[int] = ()) -> None:
        super().__init__()
        patch = visual.conv1.kernel_size[0]
        self.grid = (size[0] // patch, size[1] // patch)
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.register_buffer("positional_embedding",
                             interpolate_pos_embed(visual.positional_embedding.detach(), self.grid, pos_rule))
        self.ln_pre = visual.ln_pre
        self.blocks = nn.ModuleList(list(visual.transformer.resblocks)[:-1])
        # Folding /255 into mean and std keeps it to one Sub and one Div in the graph.
        self.register_buffer("pixel_mean", torch.tensor(mean).mul(255.0).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).mul(255.0).view(1, 3, 1, 1))
        self.guide_block = guide_block
        self.tap_blocks = tuple(tap_blocks)
        # Blocks whose attention probabilities the head reads (RCS); their mean is the guide.
        self.attention_blocks = tuple(attention_blocks)
        if sum(map(bool, (guide_block is not None, self.tap_blocks, self.attention_blocks))) > 1:
            raise ValueError("a head reads one of: a guide block's ln_2 output, tapped block outputs, "
                             "or attention probabilities")
        if any(not 0 <= b < len(self.blocks) for b in self.attention_blocks):
            raise ValueError(f"attention blocks {self.attention_blocks} outside the trunk's blocks "
                             f"0..{len(self.blocks) - 1}")

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        # Cast first: TensorRT accepts a UInt8 network input only when it feeds a Cast directly
        # (graph_checks.uint8_only_into_cast); the Transpose then runs on float.
        x = image.float().permute(0, 3, 1, 2)
        x = (x - self.pixel_mean) / self.pixel_std
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1) + self.positional_embedding
        return self.ln_pre(x)

    def forward(self, image: torch.Tensor):
        """Tokens entering the last block [B, 1+N, D], and what the head reads besides: block
        `guide_block`'s ln_2 tokens, {block index: block output} for `tap_blocks` (SC-CLIP), or the
        mean attention probabilities of `attention_blocks` (RCS)."""
        x = self.embed(image)
        guide = None
        taps = {}
        tapped = []
        for idx, block in enumerate(self.blocks):
            if idx in self.attention_blocks:
                x, probs = run_block_with_attention(block, x)
                tapped.append(probs)
                continue
            x, block_guide = run_block(block, x)
            if idx == self.guide_block:
                guide = block_guide
            if idx in self.tap_blocks:
                taps[idx] = x
        if self.tap_blocks:
            return x, taps
        if tapped:
            guide = torch.stack(tapped).mean(dim=0)
        return x, guide
