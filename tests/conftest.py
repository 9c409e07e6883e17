"""Shared fixtures: tiny and full-size random-weight CLIP towers, built once per session."""
from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

# Tests share 2 cores with nothing else in CI; more threads only add contention.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY = "ViT-T-16-test"
VOCAB = [["background"], ["cat", "kitty"], ["dog"], ["grass"]]


class _TinyHeadParams(Mapping):
    """method -> the head parameters it needs on the 3-block tiny ViT (its presets name ViT-B/16
    blocks): each family's `tiny_overrides` (clipfuse.export.heads), for every method of the
    registry; read on first use so torch-free tests never import torch."""

    def _data(self) -> dict:
        from clipfuse.export.heads import family_of
        from clipfuse.runtime.methods import METHODS
        return {m: dict(family_of(m).tiny_overrides) for m in METHODS if family_of(m).tiny_overrides}

    def __getitem__(self, key):
        return self._data()[key]

    def __iter__(self):
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())


TINY_HEAD_PARAMS = _TinyHeadParams()


def registry_heads(not_here: "dict | None" = None) -> list:
    """Every method of clipfuse.runtime.methods.METHODS as pytest parameters, so a head added to
    the registry is covered by default; `not_here` maps a head to the reason a test leaves it to
    another (a skip that says where it is covered)."""
    from clipfuse.runtime.methods import METHODS
    not_here = not_here or {}
    unknown = set(not_here) - set(METHODS)
    assert not unknown, f"not in the registry: {unknown}"
    return [pytest.param(h, marks=pytest.mark.skip(reason=not_here[h])) if h in not_here else h for h in METHODS]
PLAIN_VOCAB = [["background"], ["cat"], ["dog"], ["grass"]]


@pytest.fixture(scope="session")
def tiny_clip():
    from clipfuse.export.weights import load_clip
    return load_clip(TINY, "none", seed=0)


@pytest.fixture(scope="session")
def vitb16_clip():
    from clipfuse.export.weights import load_clip
    return load_clip("ViT-B-16", "none", seed=0)


# class 0 "background" for CLIP-DINOiser: its in-graph background rule is exercised too
VITB16_VOCAB = {"clip-dinoiser": VOCAB}
VITB16_DEFAULT_VOCAB = [["sky"], ["tree", "bush"], ["road"], ["car"]]


@pytest.fixture(scope="session")
def vitb16_graph(vitb16_clip, tmp_path_factory):
    """head -> its full-size ViT-B/16 window graph (224, one template), exported once per session:
    the FP16 pass and the RTX build of the same graph are separate tests sharing one export (each
    export is ~15 s of CI). Tests write beside it, never over it."""
    folder = tmp_path_factory.mktemp("vitb16-graphs")
    cache: dict = {}

    def get(head: str):
        if head not in cache:
            from clipfuse.export.api import ImageExportSpec, export_image_graph
            spec = ImageExportSpec(head, model="ViT-B-16", pretrained="none", size=224, templates="single",
                                   classes=VITB16_VOCAB.get(head, VITB16_DEFAULT_VOCAB))
            cache[head] = export_image_graph(spec, folder / head, clip=vitb16_clip)
        return cache[head]
    return get


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
