"""Shared fixtures: tiny and full-size random-weight CLIP towers, built once per session."""
from __future__ import annotations

import os

import pytest

# Tests share 2 cores with nothing else in CI; more threads only add contention.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY = "ViT-T-16-test"
VOCAB = [["background"], ["cat", "kitty"], ["dog"], ["grass"]]
PLAIN_VOCAB = [["background"], ["cat"], ["dog"], ["grass"]]


@pytest.fixture(scope="session")
def tiny_clip():
    from clipfuse.export.weights import load_clip
    return load_clip(TINY, "none", seed=0)


@pytest.fixture(scope="session")
def vitb16_clip():
    from clipfuse.export.weights import load_clip
    return load_clip("ViT-B-16", "none", seed=0)
