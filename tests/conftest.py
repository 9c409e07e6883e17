"""Shared fixtures: tiny and full-size random-weight CLIP towers, built once per session."""
from __future__ import annotations

import os

import pytest

# Tests share 2 cores with nothing else in CI; more threads only add contention.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY = "ViT-T-16-test"
VOCAB = [["background"], ["cat", "kitty"], ["dog"], ["grass"]]
# Head parameters a method needs on the 3-block tiny ViT (its defaults name ViT-B/16 blocks).
# The tiny test ViT has 3 blocks: heads that read given blocks of a 12-block ViT-B/16 read these.
TINY_HEAD_PARAMS = {
    "sc-clip": dict(pre_adjust_block=1, post_adjust_block=0, multi_start=0, multi_stop=2),
    "rcs": dict(attention_blocks=(0, 1)),          # ViT-B/16: 5..8
}
PLAIN_VOCAB = [["background"], ["cat"], ["dog"], ["grass"]]


@pytest.fixture(scope="session")
def tiny_clip():
    from clipfuse.export.weights import load_clip
    return load_clip(TINY, "none", seed=0)


@pytest.fixture(scope="session")
def vitb16_clip():
    from clipfuse.export.weights import load_clip
    return load_clip("ViT-B-16", "none", seed=0)


class PerturbedWeights:
    """The tiny ViT and CLIP-DINOiser conv heads with biases and LayerNorm gains perturbed
    (tests/parity_inputs.py), as files a manifest can name."""

    def __init__(self, folder, model_name: str = TINY, seed: int = 0):
        from parity_inputs import perturbed_clip_file, perturbed_dinoiser_heads_file

        from clipfuse.export.weights import load_clip
        self.model = model_name
        self.pretrained = str(perturbed_clip_file(folder / "clip-perturbed.pt", model_name, seed))
        self.clip = load_clip(model_name, self.pretrained, quick_gelu=False)
        width = self.clip.model.visual.conv1.out_channels
        self.heads = str(perturbed_dinoiser_heads_file(folder / "dinoiser-last.pt", width, seed))

    def spec(self, method: str, **fields):
        """An ImageExportSpec on these weights (pass `clip=self.clip` to build_fused /
        export_image_graph to skip reloading them)."""
        from clipfuse.export.spec import ImageExportSpec
        if method == "clip-dinoiser":
            fields.setdefault("heads_checkpoint", self.heads)
        return ImageExportSpec(method, model=self.model, pretrained=self.pretrained, quick_gelu=False, **fields)


@pytest.fixture(scope="session")
def perturbed_tiny(tmp_path_factory):
    return PerturbedWeights(tmp_path_factory.mktemp("perturbed_tiny"))
