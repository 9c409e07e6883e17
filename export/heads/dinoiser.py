"""CLIP-DINOiser (docs/methods.md#clip-dinoiser): MaskCLIP features pooled by a learned patch correlation.

    G     = ln_2 output of block L-3 (patch tokens)           [B, D, h, w]
    P     = l2n(obj_proj(G));  A = P^T P;  A[A < 0.2] = 0       [B, N, N]
    F_hat = sum_m A[n,m] F[:,m] / (sum_m A[n,m] + 1e-6)        (F: MaskCLIP features)
    prob  = softmax(100 * l2n(F_hat) . T^T)
    background (class 0 named 'background'): where max prob < 0.99 and sigmoid(bkg(l2n(G))) <= 0.5,
    prob[0] = 1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import CLIP_DINOISER, ClipDinoiserParams

from .base import DenseHead, HeadFamily, TrunkOutput, TrunkTaps
from .selfcorr import SelfCorrelationHead, last_block_flops

CORRELATION_THRESHOLD = 0.2
POOL_EPS = 1e-6
LOGIT_SCALE = 100.0
CONFIDENCE = 0.99
CORRELATION_CHANNELS = 256



class DinoiserConvHeads(nn.Module):
    """The two trained heads, named as in the public checkpoint's model_state_dict."""

    def __init__(self, width: int, proj_dim: int = 256) -> None:
        super().__init__()
        self.obj_proj = nn.Conv2d(width, proj_dim, 3, padding=1, padding_mode="replicate")
        self.bkg_decoder = nn.Conv2d(width, 1, 1)


def load_dinoiser_heads(path: Optional[str], width: int, seed: int = 0) -> Tuple[DinoiserConvHeads, str]:
    """Heads from CLIP-DINOiser's `last.pt` ({'epoch', 'model_state_dict'}), or random for None.

    Random heads come from their own seeded generator so a manifest reproduces them exactly.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = DinoiserConvHeads(width)
    if path is None or str(path).lower() == "none":
        return heads.eval(), "none"
    ckpt = Path(path)
    if not ckpt.is_file():
        raise ClipfuseError(f"CLIP-DINOiser heads checkpoint not found: {ckpt}")
    try:
        obj = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ClipfuseError(f"cannot read heads checkpoint {ckpt}: not a torch checkpoint "
                            f"({type(exc).__name__})") from None
    state = obj.get("model_state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ClipfuseError(f"heads checkpoint {ckpt} has no 'model_state_dict' "
                            "(expected CLIP-DINOiser's checkpoints/last.pt format)")
    from ..weights import check_state_dict
    expected = heads.state_dict()
    check_state_dict(expected, state, f"heads checkpoint {ckpt.name}")
    heads.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    from clipfuse.runtime.fileio import sha256_file
    return heads.eval(), f"file:{ckpt.name}@sha256:{sha256_file(ckpt)[:16]}"


def l2n(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.normalize(x, dim=dim)


class ClipDinoiserHead(DenseHead):
    score_type = "probability"

    def __init__(self, visual: nn.Module, grid: Tuple[int, int], conv_heads: DinoiserConvHeads,
                 background_rule: bool = True) -> None:
        super().__init__(visual, grid)
        self.maskclip = SelfCorrelationHead(visual, grid, attn="identity", residual=True, ffn=True)
        self.heads = conv_heads
        self.guide_block = len(visual.transformer.resblocks) - 3
        self.taps = TrunkTaps(ln2_block=self.guide_block)
        self.background_rule = background_rule

    def features(self, trunk: TrunkOutput) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        guide = trunk.ln2
        feats, _ = self.maskclip.features(TrunkOutput(tokens=trunk.tokens))  # [B, E, h, w]
        b, e = feats.shape[:2]
        g = guide[:, 1:].transpose(1, 2).reshape(b, -1, *self.grid)    # [B, D, h, w]
        p = l2n(self.heads.obj_proj(g), dim=1).flatten(2)              # [B, 256, N]
        corr = torch.matmul(p.transpose(1, 2), p)                      # [B, N, N]
        corr = torch.where(corr < CORRELATION_THRESHOLD, torch.zeros_like(corr), corr)
        pooled = torch.matmul(feats.flatten(2), corr.transpose(1, 2))  # [B, E, N]
        pooled = pooled / (corr.sum(dim=-1).unsqueeze(1) + POOL_EPS)
        background_logit = self.heads.bkg_decoder(l2n(g, dim=1))       # [B, 1, h, w]
        return pooled.reshape(b, e, *self.grid), {"background_logit": background_logit}

    def name_scores(self, cosine: torch.Tensor) -> torch.Tensor:
        return torch.softmax(LOGIT_SCALE * cosine, dim=1)

    def finalize(self, scores: torch.Tensor, extras: Dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.background_rule:
            return scores
        # sigmoid(s) > 0.5  <=>  s > 0
        unsure = (scores.max(dim=1, keepdim=True).values < CONFIDENCE) & (extras["background_logit"] <= 0)
        first = torch.where(unsure, torch.ones_like(scores[:, :1]), scores[:, :1])
        return torch.cat([first, scores[:, 1:]], dim=1)

    def params(self) -> dict:
        return {"correlation_threshold": CORRELATION_THRESHOLD, "logit_scale": LOGIT_SCALE,
                "confidence": CONFIDENCE, "guide_block": self.guide_block,
                "background_rule": self.background_rule}


def build(visual: nn.Module, grid: Tuple[int, int], params: ClipDinoiserParams, heads_checkpoint: Optional[str],
          seed: int) -> Tuple[DenseHead, dict]:
    conv_heads, source = load_dinoiser_heads(heads_checkpoint, visual.conv1.out_channels, seed)
    return ClipDinoiserHead(visual, grid, conv_heads, background_rule=params.background_rule), \
        {"heads_checkpoint": source}


def flops(shape, n: int, params: ClipDinoiserParams, as_exported: bool) -> Dict[str, int]:
    """MaskCLIP's value path, then obj_proj 3x3 conv 2 N (9 D) C, correlation 2 N^2 C, pooling
    2 E N^2, background 1x1 conv 2 N D (C = 256 correlation channels)."""
    c, d = CORRELATION_CHANNELS, shape.width
    out = last_block_flops(shape, n, "identity", True, as_exported)
    out["dinoiser_heads"] = 2 * n * 9 * d * c + 2 * n * d
    out["correlation"] = 2 * n * n * c
    out["pooling"] = 2 * shape.embed_dim * n * n
    return out


FAMILY = HeadFamily(name=CLIP_DINOISER, params=ClipDinoiserParams, build=build, flops=flops,
                    reference="clipfuse.export.heads.dinoiser_reference")
