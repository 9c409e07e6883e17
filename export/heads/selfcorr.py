"""The self-correlation family of last blocks (docs/methods.md: MaskCLIP, SCLIP, ClearCLIP, NACLIP).

One parametric block covers MaskCLIP (identity), SCLIP (qq+kk), ClearCLIP (qq) and NACLIP
(kk + Gaussian neighbourhood bias), with the residual and the FFN switchable:
    y = ln_1(x);  A = form(q, k);  a = out_proj(A v)      (identity: a = out_proj(v))
    z = x + a if residual else a;   z = z + mlp(ln_2(z)) if ffn;   F = ln_post(z)[patches] @ proj
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..attention import head_scale, merge_heads, qkv, scaled_softmax
from .base import DenseHead

ATTENTION_FORMS = ("qk", "qq", "kk", "qq+kk", "identity")


def gaussian_bias(grid: Tuple[int, int], sigma: float) -> torch.Tensor:
    """G[i, j] = exp(-||p_i - p_j||^2 / (2 sigma^2)) over patch coordinates; CLS row/column 0."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    dist2 = torch.cdist(coords, coords).pow(2)
    bias = torch.zeros(h * w + 1, h * w + 1, dtype=torch.float64)
    bias[1:, 1:] = torch.exp(-dist2 / (2.0 * sigma ** 2))
    return bias.float()


class SelfCorrelationHead(DenseHead):
    def __init__(self, visual: nn.Module, grid: Tuple[int, int], attn: str = "qq+kk",
                 gaussian_sigma: Optional[float] = None, residual: bool = True, ffn: bool = True) -> None:
        super().__init__(visual, grid)
        if attn not in ATTENTION_FORMS:
            raise ValueError(f"attention form {attn!r} not in {ATTENTION_FORMS}")
        self.attn_form = attn
        self.residual = residual
        self.ffn = ffn
        self.gaussian_sigma = gaussian_sigma
        bias = gaussian_bias(grid, gaussian_sigma) if gaussian_sigma else None
        self.register_buffer("spatial_bias", bias, persistent=False)

    def correlate(self, y: torch.Tensor) -> torch.Tensor:
        attn = self.block.attn
        q, k, v = qkv(attn, y)
        scale = head_scale(attn)
        if self.attn_form == "identity":
            mixed = v
        elif self.attn_form == "qq+kk":
            mixed = torch.matmul(scaled_softmax(q, q, scale, self.spatial_bias)
                                 + scaled_softmax(k, k, scale, self.spatial_bias), v)
        else:
            left, right = {"qk": (q, k), "qq": (q, q), "kk": (k, k)}[self.attn_form]
            mixed = torch.matmul(scaled_softmax(left, right, scale, self.spatial_bias), v)
        return attn.out_proj(merge_heads(mixed))

    def features(self, x: torch.Tensor, guide: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        block = self.block
        a = block.ls_1(self.correlate(block.ln_1(x)))
        z = x + a if self.residual else a
        if self.ffn:
            z = z + block.ls_2(block.mlp(block.ln_2(z)))
        return self.project(z), {}

    def params(self) -> dict:
        return {"attn": self.attn_form, "gaussian_sigma": self.gaussian_sigma,
                "residual": self.residual, "ffn": self.ffn}
