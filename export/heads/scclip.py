"""SC-CLIP's last block as a static graph (docs/methods.md#sc-clip).

The public code's data-dependent steps are replaced by static equivalents (exact, ties
included): the LOF quantile threshold is TopK(k_out+1) + linear interpolation, the NonZero /
index lists are a boolean mask on the flat patch index, and the outlier fix is a depthwise 3x3
neighbour mean (all-ones kernel, zero centre, zero padding). All per window, so windows batch.
Block indices are parameters so the same head runs on shallow test towers.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.methods import SC_CLIP, ScClipParams

from ..attention import head_scale, merge_heads, qkv
from .base import DenseHead, HeadFamily, TrunkOutput, TrunkTaps



def outlier_count(n: int, quantile: float) -> Tuple[int, float]:
    """(k_out, lerp weight) of `LOF > torch.quantile(LOF, q)` on n values without ties.

    torch: pos = fl32(q)*(n-1), lo = trunc(pos); the threshold lies between ascending ranks lo and
    lo+1, so n-1-lo values exceed it.
    """
    pos = float(np.float32(quantile)) * (n - 1)
    lo = int(math.floor(pos))
    return n - 1 - lo, pos - lo


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    u = x / x.norm(dim=-1, keepdim=True)
    return u @ u.transpose(-2, -1)


def threshold_rownorm(s: torch.Tensor, beta: float) -> torch.Tensor:
    """rownorm(S * [S >= beta]); kept weights are the cosine values themselves."""
    w = torch.where(s >= beta, s, torch.zeros_like(s))
    return w / (w.sum(dim=-1, keepdim=True) + 1e-6)


class Fp32Statistics(nn.Module):
    """Outlier detection, the outlier fix, cosine matrices, thresholds and the similarity prior.

    Its attribute name starts with `fp32_`, so export/fp16.py keeps every node of its scope in
    FP32 (distances, LOF, TopK thresholds and S >= beta are discontinuous in their inputs).
    """

    def __init__(self, grid: Tuple[int, int], width: int, beta: float, lof_k: int, lof_quantile: float,
                 attn_sharpen: float) -> None:
        super().__init__()
        self.grid = grid
        n = grid[0] * grid[1]
        self.beta, self.lof_k, self.attn_sharpen = beta, lof_k, attn_sharpen
        self.k_out, self.lerp = outlier_count(n, lof_quantile)
        kernel = torch.ones(1, 1, 3, 3)
        kernel[..., 1, 1] = 0.0
        self.register_buffer("nbr_kernel", kernel, persistent=False)
        self.register_buffer("nbr_kernel_dw", kernel.expand(width, 1, 3, 3).contiguous(), persistent=False)
        self.register_buffer("self_pairs", torch.eye(n, dtype=torch.bool), persistent=False)

    # --- LOF outliers, static form (docs/methods.md#sc-clip) --------------------------------------
    def outlier_mask(self, p: torch.Tensor) -> torch.Tensor:
        """LOF outliers of patches p [B, N, D] as a float mask [B, N] (1 = outlier)."""
        n = p.shape[1]
        r = (p * p).sum(-1)
        # Squared distances from the Gram matrix (FP32): the reference's difference norms order
        # the neighbours the same except for near-equal distances.
        dsq = (r.unsqueeze(-1) + r.unsqueeze(-2) - 2.0 * (p @ p.transpose(-2, -1))).clamp(min=0.0)
        dsq = torch.where(self.self_pairs, torch.full_like(dsq, -1.0), dsq)      # self is always column 0
        vals, idx = torch.topk(dsq, self.lof_k + 1, dim=-1, largest=False, sorted=True)
        kappa = vals[..., self.lof_k]                                  # [B, N]
        nb = idx[..., 1:]                                              # [B, N, k]
        lrd = self.lof_k / kappa
        gathered = torch.gather(lrd.unsqueeze(1).expand(-1, n, -1), 2, nb)
        return self.select_outliers(gathered.mean(-1) / lrd).to(p.dtype)

    def select_outliers(self, lof: torch.Tensor) -> torch.Tensor:
        """lof > quantile(lof) as a bool mask: the threshold interpolates the two ascending ranks
        around the quantile position, which are ranks k_out and k_out-1 from the top (ties too)."""
        top = torch.topk(lof, self.k_out + 1, dim=-1, largest=True, sorted=True).values
        a, b = top[..., self.k_out:self.k_out + 1], top[..., self.k_out - 1:self.k_out]
        return lof > a + self.lerp * (b - a)

    def fix(self, p: torch.Tensor, outlier: torch.Tensor) -> torch.Tensor:
        """Outliers with >= 1 inlier 8-neighbour take their inliers' mean (simultaneous update)."""
        bsz, n, d = p.shape
        h, w = self.grid
        keep = (1.0 - outlier).view(bsz, 1, h, w)
        grid_p = (p * keep.view(bsz, n, 1)).transpose(1, 2).reshape(bsz, self.nbr_kernel_dw.shape[0], h, w)
        num = F.conv2d(grid_p, self.nbr_kernel_dw, padding=1, groups=self.nbr_kernel_dw.shape[0])
        cnt = F.conv2d(keep, self.nbr_kernel, padding=1)
        num = num.reshape(bsz, d, n).transpose(1, 2)
        cnt = cnt.reshape(bsz, n, 1)
        upd = outlier.unsqueeze(-1) * (cnt > 0).to(p.dtype)
        return p * (1.0 - upd) + num / cnt.clamp(min=1.0) * upd

    def forward(self, p_last: torch.Tensor, p_pre: torch.Tensor, p_post: torch.Tensor):
        """Patches of F_last, F_pre, F_post -> (outlier mask, fixed F_last, W8, W3, attention prior)."""
        outlier = self.outlier_mask(p_last)
        fixed = self.fix(p_last, outlier)
        s8 = cosine_matrix(self.fix(p_pre, outlier))
        s3 = cosine_matrix(p_post)
        mk = self.attn_sharpen * (s8 - s8.mean(dim=(-2, -1), keepdim=True))
        # A finite mask: every row keeps its diagonal (S_ii = 1 >= mean), so softmax is unchanged.
        mk = torch.where(mk < 0, torch.full_like(mk, -1e4), mk)
        prior = torch.softmax(mk, dim=-1)
        return outlier, fixed, threshold_rownorm(s8, self.beta), threshold_rownorm(s3, self.beta), prior


class ScClipHead(DenseHead):
    def __init__(self, visual: nn.Module, grid: Tuple[int, int], pre_adjust_block: int = 8,
                 post_adjust_block: int = 3, multi_start: int = 3, multi_stop: int = 10, res_cls: float = 0.3,
                 beta: float = 0.4, lof_k: int = 30, lof_quantile: float = 0.95,
                 attn_sharpen: float = 3.0) -> None:
        super().__init__(visual, grid)
        last_in = len(visual.transformer.resblocks) - 2
        for name, idx in (("pre_adjust_block", pre_adjust_block), ("post_adjust_block", post_adjust_block)):
            if not 0 <= idx <= last_in:
                raise ValueError(f"{name}={idx} outside blocks 0..{last_in}")
        if not 0 <= multi_start < multi_stop <= last_in + 1:
            raise ValueError(f"multi-level range [{multi_start}, {multi_stop}) outside blocks 0..{last_in}")
        n = grid[0] * grid[1]
        if lof_k + 1 > n:
            raise ValueError(f"LOF needs more than {lof_k} patches, the grid has {n}")
        self.pre_adjust_block, self.post_adjust_block = pre_adjust_block, post_adjust_block
        self.multi_start, self.multi_stop = multi_start, multi_stop
        self.res_cls, self.beta, self.lof_k = res_cls, beta, lof_k
        self.lof_quantile, self.attn_sharpen = lof_quantile, attn_sharpen
        self.taps = TrunkTaps(output_blocks=tuple(sorted({pre_adjust_block, post_adjust_block,
                                                          *range(multi_start, multi_stop)})))
        self.fp32_statistics = Fp32Statistics(grid, visual.conv1.out_channels, beta, lof_k, lof_quantile,
                                              attn_sharpen)

    def kkmix(self, z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        attn = self.block.attn
        _, k, v = qkv(attn, z)
        prior = prior.unsqueeze(1)                                     # same for all heads
        kk = torch.softmax(torch.matmul(k * head_scale(attn), k.transpose(-2, -1)), dim=-1)
        return attn.out_proj(merge_heads(torch.matmul(0.5 * prior + 0.5 * kk, v)))

    def features(self, trunk: TrunkOutput) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x, taps = trunk.tokens, trunk.outputs
        ln1 = self.block.ln_1
        _, xs, w8, w3, prior = self.fp32_statistics(x[:, 1:], taps[self.pre_adjust_block][:, 1:],
                                                    taps[self.post_adjust_block][:, 1:])
        ms = sum(taps[i] for i in range(self.multi_start, self.multi_stop))
        # Both passes of block 11 in one batch: one in_proj/attention/out_proj chain in the graph
        # (two separate chains made TensorRT-RTX 1.7's FP16 build fail in Myelin).
        b = x.shape[0]
        both = self.kkmix(ln1(torch.cat([w8 @ xs, ms[:, 1:]])), torch.cat([prior, prior]))
        cls = torch.cat([x[:, :1], ms[:, :1]])
        mixed = torch.cat([w3, w3]) @ (both + self.res_cls * cls)
        z = mixed[:b] + mixed[b:]
        feats = self.ln_post(z) @ self.proj
        b, _, e = feats.shape
        return feats.transpose(1, 2).reshape(b, e, *self.grid), {}

    def params(self) -> dict:
        return {"pre_adjust_block": self.pre_adjust_block, "post_adjust_block": self.post_adjust_block,
                "multi_start": self.multi_start, "multi_stop": self.multi_stop, "res_cls": self.res_cls,
                "beta": self.beta, "lof_k": self.lof_k, "lof_quantile": self.lof_quantile,
                "attn_sharpen": self.attn_sharpen}


def build(visual: nn.Module, grid: Tuple[int, int], params: ScClipParams, heads_checkpoint: Optional[str],
          seed: int) -> Tuple[DenseHead, dict]:
    try:
        return ScClipHead(visual, grid, **asdict(params)), {}
    except ValueError as exc:
        raise ClipfuseError(f"sc-clip: {exc}") from None


def flops(shape, n: int, params: ScClipParams, as_exported: bool) -> Dict[str, int]:
    """The last block's attention runs twice on the N patch tokens (main and multi-level pass; k, v
    needed, the graph's packed in_proj also computes q), each 2 N D (2D|3D) + 2 * 2 N^2 D + 2 N D^2,
    no MLP; similarity work 2 N^2 D each for the LOF Gram matrix, S8, S3, W8 X and W3 X (twice)
    = 12 N^2 D; two depthwise 3x3 neighbour sums (features and inlier counts) 2 * 2 * 9 N (D + 1)."""
    d = shape.width
    one_pass = 2 * n * d * (3 * d if as_exported else 2 * d) + 2 * 2 * n * n * d + 2 * n * d * d
    return {"last_block": 2 * one_pass,
            "similarities": 12 * n * n * d + 2 * 2 * 9 * n * (d + 1)}    # + the inlier-count conv


FAMILY = HeadFamily(name=SC_CLIP, params=ScClipParams, build=build, flops=flops,
                    reference="clipfuse.export.heads.scclip_reference", fp32_scopes=("fp32_statistics",),
                    # the 3-block test ViT; ViT-B/16: 8, 3, 3..9
                    tiny_overrides=dict(pre_adjust_block=1, post_adjust_block=0, multi_start=0, multi_stop=2))
