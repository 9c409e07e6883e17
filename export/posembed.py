"""Positional tables for a non-native input size, baked at export time.

open_clip never interpolates at run time; each method's code does it its own way, and the two
rules give different tables for the same size, so the rule is part of the head's parameters.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

RULES = ("size", "scale")


def interpolate_pos_embed(table: torch.Tensor, grid: Tuple[int, int], rule: str) -> torch.Tensor:
    """[1 + n*n, D] table -> [1 + h*w, D] for grid (h, w); the CLS row is kept as it is.

    rule "size": bicubic to (h, w) by size (MaskCLIP / CLIP-DINOiser).
    rule "scale": bicubic with scale_factor ((h+0.1)/n, (w+0.1)/n), the DINO rule (SCLIP family).
    """
    if rule not in RULES:
        raise ValueError(f"unknown positional-embedding rule {rule!r}")
    cls_row, patch = table[:1], table[1:]
    n = int(round(math.sqrt(patch.shape[0])))
    h, w = grid
    if (h, w) == (n, n):
        return table.clone()
    dim = patch.shape[1]
    patch = patch.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    if rule == "size":
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", align_corners=False)
    else:
        patch = F.interpolate(patch, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic",
                              align_corners=False)
    assert patch.shape[-2:] == (h, w), patch.shape
    patch = patch.permute(0, 2, 3, 1).reshape(h * w, dim)
    return torch.cat([cls_row, patch], dim=0)
