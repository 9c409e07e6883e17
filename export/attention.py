"""Multi-head attention pieces written out with the weights of open_clip's nn.MultiheadAttention.

Written decomposed (not F.scaled_dot_product_attention) so the exported ONNX has the pattern
TensorRT fuses into one MHA kernel: scale multiplied into Q *before* the first MatMul.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, heads, T, D/heads]."""
    b, t, d = x.shape
    return x.reshape(b, t, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> [B, T, heads*d]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def qkv(attn: nn.MultiheadAttention, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V (with biases) per head, from the packed in_proj of open_clip's attention."""
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    n = attn.num_heads
    return split_heads(q, n), split_heads(k, n), split_heads(v, n)


def scaled_softmax(a: torch.Tensor, b: torch.Tensor, scale: float, bias: "torch.Tensor | None" = None) -> torch.Tensor:
    """softmax((a * scale) b^T [+ bias]) over the last axis; scale applied to the left operand."""
    logits = torch.matmul(a * scale, b.transpose(-2, -1))
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1)


def head_scale(attn: nn.MultiheadAttention) -> float:
    return float(attn.head_dim) ** -0.5


def standard_attention(attn: nn.MultiheadAttention, y: torch.Tensor) -> torch.Tensor:
    """Vanilla self-attention, equal to open_clip's block attention (no mask)."""
    q, k, v = qkv(attn, y)
    weights = scaled_softmax(q, k, head_scale(attn))
    return attn.out_proj(merge_heads(torch.matmul(weights, v)))
