"""The self-correlation family of last blocks (docs/methods.md: MaskCLIP, SCLIP, ClearCLIP, NACLIP).

One parametric block covers MaskCLIP (identity), SCLIP (qq+kk), ClearCLIP (qq) and NACLIP
(kk + Gaussian neighbourhood bias), with the residual and the FFN switchable:
    y = ln_1(x);  A = form(q, k);  a = out_proj(A v)      (identity: a = out_proj(v))
    z = x + a if residual else a;   z = z + mlp(ln_2(z)) if ffn;   F = ln_post(z)[patches] @ proj
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import ATTENTION_FORMS, SELF_CORRELATION, SelfCorrelationParams

from ..attention import head_scale, merge_heads, qkv, scaled_softmax
from .base import DenseHead, HeadFamily, TrunkOutput, block_flops

# The attention forms -> number of T x T logit products (FLOPs).
LOGIT_PRODUCTS = {"identity": 0, "qk": 1, "qq": 1, "kk": 1, "qq+kk": 2}


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

    def features(self, trunk: TrunkOutput) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x = trunk.tokens
        block = self.block
        a = block.ls_1(self.correlate(block.ln_1(x)))
        z = x + a if self.residual else a
        if self.ffn:
            z = z + block.ls_2(block.mlp(block.ln_2(z)))
        return self.project(z), {}

    def params(self) -> dict:
        return {"attn": self.attn_form, "gaussian_sigma": self.gaussian_sigma,
                "residual": self.residual, "ffn": self.ffn}


def build(visual: nn.Module, grid: Tuple[int, int], params: SelfCorrelationParams, heads_checkpoint: Optional[str],
          seed: int) -> Tuple[DenseHead, dict]:
    if params.attn not in ATTENTION_FORMS:
        raise ClipfuseError(f"attention form {params.attn!r} not in {', '.join(ATTENTION_FORMS)}")
    return SelfCorrelationHead(visual, grid, **asdict(params)), {}


def last_block_flops(shape, n: int, form: str, ffn: bool, as_exported: bool) -> Dict[str, int]:
    """The last block with attention `form` on T = N + 1 tokens (the graph's packed in_proj also
    computes Q and K for the identity form: counted when `as_exported`)."""
    value_only = form == "identity"
    last = block_flops(n + 1, shape.width, shape.mlp_width, LOGIT_PRODUCTS[form], value_only and not as_exported, ffn)
    if value_only and as_exported:
        last["attention"] = 0
    return {"last_block": sum(last.values())}


def flops(shape, n: int, params: SelfCorrelationParams, as_exported: bool) -> Dict[str, int]:
    return last_block_flops(shape, n, params.attn, bool(params.ffn), as_exported)


FAMILY = HeadFamily(name=SELF_CORRELATION, params=SelfCorrelationParams, build=build, flops=flops,
                    reference="clipfuse.export.heads.selfcorr_reference")
