"""What every dense head shares, and what makes a head family a plugin.

A head family is ONE module in this package that defines `FAMILY = HeadFamily(...)`:
  - `params`: the frozen dataclass of the head's parameters (torch-free, in
    clipfuse.runtime.methods beside the presets: `clipfuse export` generates its flags from the
    fields' metadata without importing torch, export/head_args.py);
  - `build(visual, grid, params, heads_checkpoint, seed) -> (DenseHead, weights description)`;
  - the trunk taps its head reads (`DenseHead.taps`, one typed `TrunkTaps` request; the trunk
    answers with one `TrunkOutput`);
  - `flops(shape, n, params, as_exported)`: the dense products of the replaced last block and the
    head's extra modules (benchmarks/flops.py adds trunk, projection and classifier);
  - `reference`: the module of its independent PyTorch reference (it shares no code with the fused
    path; tests/test_head_families.py checks its imports);
  - `fp32_scopes`: submodule names whose whole scope the FP16 conversion keeps FP32 (export/fp16.py);
  - `tiny_overrides`: the parameters it needs on the 3-block test ViT (its presets name ViT-B/16 blocks).
The package discovers the modules (export/heads/__init__.py); a method naming the family in
clipfuse.runtime.methods.METHODS is all the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..trunk import TrunkOutput, TrunkTaps

__all__ = ["DenseHead", "HeadFamily", "TrunkOutput", "TrunkTaps", "block_flops"]


class DenseHead(nn.Module):
    """Replaces the last ViT block; maps the trunk's output to features F [B, E, h, w].

    Subclasses implement `features`. `name_scores`/`finalize` let a head change how cosine
    similarities become the graph's scores (CLIP-DINOiser turns them into probabilities).
    """

    score_type = "cosine"
    taps = TrunkTaps()

    def __init__(self, visual: nn.Module, grid: Tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.block = visual.transformer.resblocks[-1]
        self.ln_post = visual.ln_post
        self.proj = visual.proj

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post over patch tokens, @ proj, as [B, E, h, w] (not normalised)."""
        feats = self.ln_post(x[:, 1:]) @ self.proj
        b, _, e = feats.shape
        return feats.transpose(1, 2).reshape(b, e, *self.grid)

    def features(self, trunk: TrunkOutput) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def name_scores(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine

    def finalize(self, scores: torch.Tensor, extras: Dict[str, torch.Tensor]) -> torch.Tensor:
        return scores

    def params(self) -> dict:
        return {}


# --- FLOPs -----------------------------------------------------------------------------------------
def block_flops(t: int, d: int, m: int, logit_products: int, value_only: bool, ffn: bool) -> Dict[str, int]:
    """One transformer block's dense products on T tokens (one multiply-add = 2 FLOPs);
    `value_only`: V projection only, no attention; `logit_products`: T x T logit products."""
    out = {"qkv": 2 * t * d * (d if value_only else 3 * d),
           "attention": 0 if value_only else 2 * t * t * d * (logit_products + 1),
           "out_proj": 2 * t * d * d}
    out["mlp"] = 2 * 2 * t * d * m if ffn else 0
    return out


# (visual, grid, typed params, heads checkpoint, seed) -> (DenseHead, weights description)
HeadBuilder = Callable[[nn.Module, Tuple[int, int], Any, Optional[str], int], Tuple[DenseHead, dict]]
# (shape with width/mlp_width/embed_dim, patches N, typed params, as_exported) -> {component: FLOPs}
FlopCounter = Callable[[Any, int, Any, bool], Dict[str, int]]


@dataclass(frozen=True)
class HeadFamily:
    name: str                      # the MethodSpec.head_family value
    params: type                   # frozen dataclass of the head's parameters
    build: HeadBuilder
    flops: FlopCounter
    reference: str                 # module of the independent reference (see export/reference.py)
    fp32_scopes: Tuple[str, ...] = ()
    tiny_overrides: Dict[str, Any] = field(default_factory=dict)
