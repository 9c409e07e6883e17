"""Weights and images that let parity tests fail, shared by every test that compares with a reference.

open_clip's random init zeroes every bias and sets every LayerNorm gain to 1, so a dropped or
misplaced bias (attention in_proj/out_proj, conv heads) or LayerNorm affine changes nothing and a
parity test passes on broken code. `perturb_` moves biases (+ N(0, bias_std)) and LayerNorm gains
(x U[gain]) off that init. Pure noise images make every patch alike, so similarity thresholds
(SCLIP's, CLIP-DINOiser's 0.2 correlation cut) are never crossed: `smooth_image` upsamples a coarse
random grid, so neighbouring patches look alike, as in photos.

The perturbed weights go through FILES (an open_clip state dict, a CLIP-DINOiser `last.pt`) so a
graph's manifest names them and `ReferenceModel.from_manifest` rebuilds the same model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

BIAS_STD = 0.1
GAIN_RANGE = (0.8, 1.2)


def perturb_(module, seed: int, bias_std: float = BIAS_STD, gain: Tuple[float, float] = GAIN_RANGE):
    """In place: every parameter named *bias (in_proj_bias too) += N(0, bias_std); every
    LayerNorm weight *= U[gain]. Returns `module`."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    gains = {id(m.weight) for m in module.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=gen) * bias_std)
            elif id(param) in gains:
                low, high = gain
                param.mul_(low + (high - low) * torch.rand(param.shape, generator=gen))
    return module


def perturbed_clip_file(path: Path, model_name: str, seed: int = 0) -> Path:
    """An open_clip-format state dict of `model_name`'s seeded random weights, perturbed.
    Load it with quick_gelu=False (an open_clip file of a plain architecture does not say)."""
    import torch

    from clipfuse.export.weights import load_clip

    model = perturb_(load_clip(model_name, "none", seed=seed).model, seed + 1)
    torch.save(model.state_dict(), path)
    return path


def perturbed_dinoiser_heads_file(path: Path, width: int, seed: int = 0) -> Path:
    """CLIP-DINOiser conv heads in the public `last.pt` layout, obj_proj bias perturbed."""
    import torch

    from clipfuse.export.heads.dinoiser import load_dinoiser_heads

    heads, _ = load_dinoiser_heads(None, width, seed=seed)
    # The background decoder's scalar bias decides alone, on random features, whether the
    # background rule fires everywhere or nowhere; kept as initialised so it fires on some patches.
    keep = heads.bkg_decoder.bias.detach().clone()
    perturb_(heads, seed + 1)
    with torch.no_grad():
        heads.bkg_decoder.bias.copy_(keep)
    torch.save({"epoch": 0, "model_state_dict": heads.state_dict()}, path)
    return path


def smooth_image(height: int, width: int, seed: int, coarse: Tuple[int, int] = (6, 8),
                 noise: float = 6.0) -> np.ndarray:
    """uint8 [H, W, 3]: a coarse random grid upsampled bilinearly, plus mild pixel noise."""
    rng = np.random.default_rng(seed)
    grid = rng.random((coarse[0], coarse[1], 3)) * 255
    ys = np.linspace(0, coarse[0] - 1, height)
    xs = np.linspace(0, coarse[1] - 1, width)
    y0 = np.minimum(np.floor(ys).astype(int), coarse[0] - 2)
    x0 = np.minimum(np.floor(xs).astype(int), coarse[1] - 2)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x0 + 1] * wx
    bottom = grid[y0 + 1][:, x0] * (1 - wx) + grid[y0 + 1][:, x0 + 1] * wx
    img = top * (1 - wy) + bottom * wy + rng.normal(0, noise, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 [n, size, size, 3] smooth images (one seed each)."""
    return np.stack([smooth_image(size, size, seed * 1000 + i) for i in range(n)])


def match_reference(build, onnx_path: Path, images: np.ndarray, tol: float) -> Tuple[np.ndarray, np.ndarray]:
    """Assert the fused module of `build` and its exported graph (ONNX Runtime CPU) both equal the
    independent reference (export.reference) on `images` within `tol`; returns (reference, graph)
    scores for the caller's own checks."""
    import onnxruntime as ort
    import torch

    from clipfuse.export.reference import ReferenceModel

    expected = ReferenceModel.from_build(build)(images)
    with torch.no_grad():
        fused = build.module(torch.from_numpy(images)).numpy()
    assert np.abs(fused - expected).max() <= tol, f"fused module: max |d| {np.abs(fused - expected).max():.2e}"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["scores"], {"image": images})[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() <= tol, \
        f"ONNX graph: max |d| {np.abs(got - expected).max():.2e}"
    return expected, got
