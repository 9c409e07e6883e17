"""ResCLIP's RCS on NACLIP (docs/methods.md#resclip-rcs; SFR excluded).

    A_c = mean of the attention probabilities of blocks 5..8 (per head, CLS row/column kept),
          tapped from those blocks inside the same graph (VisionTrunk.attention_blocks)
    k, v from ln_1 of the last block's input;  A_s = softmax(s k k^T + G)   (NACLIP, G Gaussian)
    A   = tau ((1 - lam) A_s + lam A_c)        rows sum to tau, not 1 (tau 2.0 matters: out_proj bias)
    F   = ln_post(out_proj(A v))[patches] @ proj   (no residual, no FFN)
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import RCS, RcsParams

from ..attention import head_scale, merge_heads, qkv, scaled_softmax
from .base import DenseHead, HeadFamily, TrunkOutput, TrunkTaps
from .selfcorr import gaussian_bias, last_block_flops


class RcsHead(DenseHead):
    def __init__(self, visual: nn.Module, grid: Tuple[int, int], lam: float = 0.3, tau: float = 2.0,
                 gaussian_sigma: Optional[float] = 5.0, attention_blocks: Sequence[int] = (5, 6, 7, 8)) -> None:
        super().__init__(visual, grid)
        self.lam = float(lam)
        self.tau = float(tau)
        # None or 0 (--gaussian-sigma 0): no neighbourhood bias, as for the self-correlation heads
        self.gaussian_sigma = float(gaussian_sigma) if gaussian_sigma else None
        self.attention_blocks = tuple(int(b) for b in attention_blocks)
        self.taps = TrunkTaps(attention_blocks=self.attention_blocks)
        last = len(visual.transformer.resblocks) - 1
        if not self.attention_blocks or any(not 0 <= b < last for b in self.attention_blocks):
            raise ValueError(f"RCS attention blocks {self.attention_blocks} must lie in 0..{last - 1}")
        bias = gaussian_bias(grid, self.gaussian_sigma) if self.gaussian_sigma else None
        self.register_buffer("spatial_bias", bias, persistent=False)

    def features(self, trunk: TrunkOutput) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x, guide = trunk.tokens, trunk.mean_attention
        block = self.block
        attn = block.attn
        _, k, v = qkv(attn, block.ln_1(x))
        self_attn = scaled_softmax(k, k, head_scale(attn), self.spatial_bias)
        mixed = self.tau * ((1.0 - self.lam) * self_attn + self.lam * guide)
        out = block.ls_1(attn.out_proj(merge_heads(torch.matmul(mixed, v))))
        return self.project(out), {}

    def params(self) -> dict:
        return {"lam": self.lam, "tau": self.tau, "gaussian_sigma": self.gaussian_sigma,
                "attention_blocks": list(self.attention_blocks)}


def build(visual: nn.Module, grid: Tuple[int, int], params: RcsParams, heads_checkpoint: Optional[str],
          seed: int) -> Tuple[DenseHead, dict]:
    try:
        return RcsHead(visual, grid, **asdict(params)), {}
    except ValueError as exc:
        raise ClipfuseError(str(exc)) from None


def flops(shape, n: int, params: RcsParams, as_exported: bool) -> Dict[str, int]:
    """NACLIP's last block: the mean of the tapped attention maps and the tau/lambda mix are
    element-wise. Its cost is not in FLOPs: the tapped blocks materialise their H x T x T
    probabilities, which stops TensorRT's fused MHA kernel there (measure with `clipfuse bench`)."""
    return last_block_flops(shape, n, "kk", False, as_exported)


FAMILY = HeadFamily(name=RCS, params=RcsParams, build=build, flops=flops,
                    reference="clipfuse.export.heads.rcs_reference",
                    tiny_overrides={"attention_blocks": (0, 1)})     # ViT-B/16: 5..8
