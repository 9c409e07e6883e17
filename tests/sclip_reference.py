"""SCLIP's postprocess_result written in torch, as its public code does it: the independent
reference the runtime's numpy post-processing is tested against (used by several test files)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipfuse.runtime.methods import Protocol


def reference_postprocess(logits: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """SCLIP's postprocess_result (cosine) or plain argmax (probability) on [K, H, W]."""
    if protocol.score_type == "probability":
        return logits.argmax(0)
    seg_logits = (logits * protocol.logit_scale).softmax(0)
    num_cls = seg_logits.shape[0]
    if protocol.area_thd is not None:
        predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(seg_logits.dtype)
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area_pred = (area_pred > protocol.area_thd * area_pred.sum()).to(seg_logits.dtype)
        seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < protocol.prob_thd] = 0
    return seg_pred[0]
