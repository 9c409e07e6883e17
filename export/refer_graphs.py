"""Global-Local CLIP (zero-shot referring segmentation, CVPR 2023) as two exportable modules.

GLOBAL ("token masking"): one image, N soft masks at grid resolution. Blocks 0..L-4 run once;
before EACH of the last `masked_blocks` blocks every patch token (not CLS) is multiplied by its
mask value, batched over the N masks; the blocks themselves are unchanged. f_G = ln_post(CLS) @ proj.
LOCAL: N masked, box-cropped crops already resized to the input size -> the unmodified CLIP image
feature ln_post(CLS) @ proj.

Both take pixels NHWC and normalise in the graph. The public code normalises with the ImageNet
mean/std (not CLIP's); that is the default here for parity and is recorded in the manifest.
Both inputs are float32 on the 0..255 pixel scale, not uint8: the public code resizes the
normalised float tensor (224 image: from its 800-pixel copy; crops: from that copy resized back),
so its inputs are never whole numbers, and rounding them to uint8 moves features by ~5e-3 (global)
to ~1e-2 (crops). Normalising after the bilinear resize equals the public normalise-then-resize
(the resize weights sum to 1), up to float rounding.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from clipfuse.runtime.errors import ClipfuseError

from .trunk import CLIP_MEAN, CLIP_STD, VisionTrunk, run_block

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS: Dict[str, Tuple[Sequence[float], Sequence[float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),   # what the public Global-Local CLIP code uses
    "clip": (CLIP_MEAN, CLIP_STD),
}
INPUT_SIZE = 224          # the public code resizes images and crops to 224x224
DEFAULT_MASKED_BLOCKS = 3  # masking before blocks 9, 10, 11 of a 12-block ViT


def check_visual(visual: nn.Module) -> None:
    """Refuse towers whose pooling is not 'ln_post on the CLS token, then proj'."""
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" \
            or getattr(visual, "final_ln_after_pool", False) or visual.proj is None:
        raise ClipfuseError("Global-Local CLIP needs a plain CLS-token ViT with a projection "
                            "(e.g. ViT-B-32, ViT-B-16)")


def _normalization(name: str) -> Tuple[Sequence[float], Sequence[float]]:
    if name not in NORMALIZATIONS:
        raise ClipfuseError(f"unknown normalization {name!r}; choose one of: {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


class _ReferTower(nn.Module):
    """Shared pieces: the in-graph normalisation + embedding, blocks, and the CLS projection."""

    def __init__(self, visual: nn.Module, normalization: str = "imagenet") -> None:
        super().__init__()
        check_visual(visual)
        mean, std = _normalization(normalization)
        self.trunk = VisionTrunk(visual, (INPUT_SIZE, INPUT_SIZE), "size", mean=mean, std=std)
        self.grid = self.trunk.grid
        self.blocks = nn.ModuleList(list(visual.transformer.resblocks))
        self.ln_post = visual.ln_post
        self.proj = visual.proj

    def cls_features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token through ln_post and the projection (raw, not normalised)."""
        return self.ln_post(x[:, 0]) @ self.proj


class ReferGlobal(_ReferTower):
    """image float32 [1, S, S, 3] (0..255 scale) + masks float32 [N, g, g] -> features [N, E] (raw)."""

    def __init__(self, visual: nn.Module, normalization: str = "imagenet",
                 masked_blocks: int = DEFAULT_MASKED_BLOCKS) -> None:
        super().__init__(visual, normalization)
        if not 1 <= masked_blocks <= len(self.blocks):
            raise ClipfuseError(f"masked_blocks must be in 1..{len(self.blocks)}, got {masked_blocks}")
        self.first_masked = len(self.blocks) - masked_blocks

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x = self.trunk.embed(image)
        for block in self.blocks[:self.first_masked]:
            x, _ = run_block(block, x)
        # [N, g*g, 1]: one weight per patch token; CLS is never masked.
        weights = masks.reshape(masks.shape[0], -1, 1)
        cls = x[:, :1].expand(masks.shape[0], -1, -1)
        patches = x[:, 1:]
        for block in self.blocks[self.first_masked:]:
            x, _ = run_block(block, torch.cat([cls, patches * weights], dim=1))
            cls, patches = x[:, :1], x[:, 1:]
        return self.cls_features(x)


class ReferLocal(_ReferTower):
    """crops float32 [N, S, S, 3] (0..255 pixel scale) -> features float32 [N, E] (raw)."""

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.trunk.embed(crops)
        for block in self.blocks:
            x, _ = run_block(block, x)
        return self.cls_features(x)


def example_inputs(module: nn.Module, num_masks: int = 2, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes (for tracing and parity tests)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(module, ReferGlobal):
        image = torch.rand((1, INPUT_SIZE, INPUT_SIZE, 3), generator=gen) * 255.0
        masks = torch.rand((num_masks, *module.grid), generator=gen)
        return image, masks
    crops = torch.rand((num_masks, INPUT_SIZE, INPUT_SIZE, 3), generator=gen) * 255.0
    return (crops,)


def export_onnx(module: nn.Module, path: str, opset: int = 17) -> None:
    """Trace `module` to ONNX with the number of masks/crops dynamic."""
    module = module.eval()
    inputs = example_inputs(module)
    if isinstance(module, ReferGlobal):
        names, axes = ["image", "masks"], {"masks": {0: "masks"}, "features": {0: "masks"}}
    else:
        names, axes = ["crops"], {"crops": {0: "crops"}, "features": {0: "crops"}}
    # torch >= 2.9 defaults to the dynamo exporter, which breaks dynamic_axes; older has no flag
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: pinned on purpose
        torch.onnx.export(module, inputs, path, input_names=names, output_names=["features"],
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True, **kwargs)
