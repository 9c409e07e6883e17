"""Global-Local CLIP's public pipeline, re-written for the parity tests from its code
(Seonghoon-Yu/Zero-shot-RIS at 75ff6ed) with torchvision, PIL and the unmodified open_clip tower.
It shares nothing with clipfuse's runtime or exporter: a separate code path to compare against.

  data/dataset_refer_bert.py:163-165   T.Resize(800) on the PIL image, ToTensor, Normalize
  Our_method_with_free_solo.py:83-105  original/224 tensor resizes, uint8 masks, resized_crop, fusion
  model/backbone.py:650-673            token masking (sequence-first, as the public code)
  freesolo/.../solov2.py:723-729       boxes from the masks' projections

The public code ran torchvision 0.11, whose tensor resize did not antialias; torchvision >= 0.17
antialiases by default, so the tensor resizes here pass antialias=False (the PIL resize of the
800-pixel copy always antialiases, as then).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
HEIGHT = WIDTH = 224


def dataset_image(image: np.ndarray) -> Tuple[torch.Tensor, int, int]:
    """What ReferDataset.__getitem__ hands the model: the normalised 800-pixel copy + the size."""
    img = Image.fromarray(image).convert("RGB")
    resized_img = T.Resize(800)(img)
    resized_img = T.ToTensor()(resized_img)
    resized_img = T.Normalize(MEAN, STD)(resized_img)
    return resized_img, np.asarray(img).shape[0], np.asarray(img).shape[1]


def center_of_mass(bitmasks: torch.Tensor):
    _, h, w = bitmasks.size()
    ys = torch.arange(0, h, dtype=torch.float32)
    xs = torch.arange(0, w, dtype=torch.float32)
    m00 = bitmasks.sum(dim=-1).sum(dim=-1).clamp(min=1e-6)
    m10 = (bitmasks * xs).sum(dim=-1).sum(dim=-1)
    m01 = (bitmasks * ys[:, None]).sum(dim=-1).sum(dim=-1)
    return m10 / m00, m01 / m00


def freesolo_boxes(seg_masks: torch.Tensor) -> torch.Tensor:
    """seg_masks bool [N, H, W] -> float boxes [N, 4] (x1, y1, x2, y2), solov2.py's way."""
    seg_masks = seg_masks.float()
    width_proj = seg_masks.max(1)[0]
    height_proj = seg_masks.max(2)[0]
    width, height = width_proj.sum(1), height_proj.sum(1)
    center_ws, _ = center_of_mass(width_proj[:, None, :])
    _, center_hs = center_of_mass(height_proj[:, :, None])
    return torch.stack([center_ws - 0.5 * width, center_hs - 0.5 * height,
                        center_ws + 0.5 * width, center_hs + 0.5 * height], 1)


def _resblock(resblock, x_lnd: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """The public CLIP's blocks are sequence-first; open_clip's may be batch-first."""
    if batch_first:
        return resblock(x_lnd.permute(1, 0, 2)).permute(1, 0, 2)
    return resblock(x_lnd)


def token_masking(visual, image: torch.Tensor, pred_masks: torch.Tensor, masking_block: int) -> torch.Tensor:
    """CLIPViTFM.forward(image, pred_masks, masking_type='token_masking') on an open_clip tower."""
    batch_first = getattr(visual.transformer, "batch_first", True)
    blocks = visual.transformer.resblocks
    last_layer = len(blocks) - 1
    x = visual.conv1(image)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    x = x.permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype),
                   x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    L, N, D = x[1:, :, :].size(0), x.size(1), x.size(2)
    size = int(np.sqrt(L))
    pred_masks = TF.resize(pred_masks.type(torch.float32), (size, size), antialias=False)
    for block_idx, resblock in enumerate(blocks):
        if block_idx >= masking_block:
            cls = x[:1, :, :]
            x = x[1:, :, :]
            x = x.permute(1, 2, 0)
            x = x.reshape(N, D, size, size).contiguous()
            x = torch.mul(x, pred_masks[:, None, :, :])
            N = x.size(0)
            x = x.view(N, D, L).contiguous()
            x = x.permute(2, 0, 1)
            x = torch.cat([cls.expand(-1, N, -1), x], dim=0)
            x = _resblock(resblock, x, batch_first)
            if block_idx == last_layer:
                x = x.permute(1, 0, 2)
                x = visual.ln_post(x[:, 0, :])
                x = x @ visual.proj
        else:
            x = _resblock(resblock, x, batch_first)
    return x


@torch.no_grad()
def public_features(visual, image: np.ndarray, masks: np.ndarray,
                    masking_block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask_features, crop_features) for one image and N masks [N, H, W]
    (bool, or soft floats: Our_method_with_free_solo.py as written, the box from the mask's
    support as FreeSOLO's binary mask would give it)."""
    tensor, height, width = dataset_image(image)
    pred_masks = torch.from_numpy(np.asarray(masks))
    if pred_masks.dtype != torch.bool:
        pred_masks = pred_masks.float()
    pred_boxes = freesolo_boxes(pred_masks > 0)
    batch = tensor[None]
    original_imgs = torch.stack([T.Resize((height, width), antialias=False)(img) for img in batch], dim=0)
    resized_imgs = torch.stack([T.Resize((HEIGHT, WIDTH), antialias=False)(img) for img in batch], dim=0)
    pixel_mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    cropped_imgs = []
    for pred_box, pred_mask in zip(pred_boxes, pred_masks):
        pred_mask, pred_box = pred_mask.type(torch.uint8), pred_box.type(torch.int)
        masked_image = original_imgs * pred_mask[None, None, ...] + (1 - pred_mask[None, None, ...]) * pixel_mean
        x1, y1, x2, y2 = int(pred_box[0]), int(pred_box[1]), int(pred_box[2]), int(pred_box[3])
        masked_image = TF.resized_crop(masked_image.squeeze(0), y1, x1, (y2 - y1), (x2 - x1), (HEIGHT, WIDTH),
                                       antialias=False)
        cropped_imgs.append(masked_image)
    cropped_imgs = torch.stack(cropped_imgs, dim=0)
    mask_features = token_masking(visual, resized_imgs, pred_masks, masking_block)
    crop_features = visual(cropped_imgs)
    return mask_features, crop_features


def fuse(mask_features: torch.Tensor, crop_features: torch.Tensor, v: float) -> torch.Tensor:
    """visual_feature = v * mask_features + (1 - v) * crop_features."""
    return v * mask_features + (1 - v) * crop_features


def calculate_score(visual_feature: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIPViTFM.calculate_score: 100 * cos -> [N, T]."""
    image_features = visual_feature / visual_feature.norm(dim=1, keepdim=True)
    text_features = text_features / text_features.norm(dim=1, keepdim=True)
    return 100.0 * image_features @ text_features.t()
