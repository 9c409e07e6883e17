"""The unchanged part of the CLIP ViT: uint8 pixels -> tokens entering the last block.

Pixels arrive as uint8 NHWC, the layout decoders produce, and the CLIP normalisation happens in
the graph so every backend and every caller sees the same contract.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import head_scale, merge_heads, qkv, scaled_softmax, standard_attention
from .posembed import interpolate_pos_embed

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TrunkTaps:
    """What a head reads from the trunk besides the tokens entering the last block."""

    ln2_block: Optional[int] = None              # ln_2 of this block's mid-point (CLIP-DINOiser's guide)
    output_blocks: Tuple[int, ...] = ()          # these blocks' outputs [B, 1+N, D] (SC-CLIP)
    attention_blocks: Tuple[int, ...] = ()       # mean of these blocks' attention probabilities (RCS)


@dataclass
class TrunkOutput:
    """The trunk's answer to a TrunkTaps request."""

    tokens: torch.Tensor                                              # entering the last block [B, 1+N, D]
    ln2: Optional[torch.Tensor] = None                                # TrunkTaps.ln2_block
    outputs: Dict[int, torch.Tensor] = field(default_factory=dict)    # TrunkTaps.output_blocks
    mean_attention: Optional[torch.Tensor] = None                     # [B, heads, T, T]


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
                 taps: TrunkTaps = TrunkTaps()) -> None:
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
        self.taps = taps
        tapped = set(taps.output_blocks) | set(taps.attention_blocks) | (
            set() if taps.ln2_block is None else {taps.ln2_block})
        if any(not 0 <= b < len(self.blocks) for b in tapped):
            raise ValueError(f"tapped blocks {sorted(tapped)} outside the trunk's blocks 0..{len(self.blocks) - 1}")

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        # Cast first: TensorRT accepts a UInt8 network input only when it feeds a Cast directly
        # (graph_checks.uint8_only_into_cast); the Transpose then runs on float.
        x = image.float().permute(0, 3, 1, 2)
        x = (x - self.pixel_mean) / self.pixel_std
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1) + self.positional_embedding
        return self.ln_pre(x)

    def forward(self, image: torch.Tensor) -> TrunkOutput:
        """Tokens entering the last block [B, 1+N, D] and what `taps` asks for besides."""
        taps = self.taps
        x = self.embed(image)
        out = TrunkOutput(tokens=x)
        probs = []
        for idx, block in enumerate(self.blocks):
            if idx in taps.attention_blocks:
                x, block_probs = run_block_with_attention(block, x)
                probs.append(block_probs)
                continue
            x, block_ln2 = run_block(block, x)
            if idx == taps.ln2_block:
                out.ln2 = block_ln2
            if idx in taps.output_blocks:
                out.outputs[idx] = x
        out.tokens = x
        if probs:
            out.mean_attention = torch.stack(probs).mean(dim=0)
        return out
