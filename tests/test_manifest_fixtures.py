"""Manifests written by the exporter before the typed-manifest work (tests/data/manifests/, made
by `python tests/graph_identity.py --manifests tests/data/manifests`) keep loading: the reader
accepts them, window graphs give back their protocol, and image/frame manifests rebuild the spec
that exported them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipfuse.export.spec import ImageExportSpec
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.methods import METHODS
from clipfuse.runtime.protocol import protocol_from_manifest

FIXTURES = Path(__file__).parent / "data" / "manifests"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def test_every_kind_and_head_has_a_fixture():
    kinds = {json.loads((FIXTURES / f"{n}.json").read_text())["kind"] for n in NAMES}
    assert kinds == {"image", "frame", "text", "refer-global", "refer-local"}
    assert set(METHODS) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads(name):
    manifest = read_manifest(FIXTURES / f"{name}.json")
    if manifest["kind"] in ("image", "frame"):
        spec = ImageExportSpec.from_manifest(manifest)
        assert spec.method == manifest["head"]["name"]
        assert spec.size == 112 and spec.model == "ViT-T-16-test"
        assert (spec.frame is not None) == (manifest["kind"] == "frame")
    if manifest["kind"] == "image":
        protocol = protocol_from_manifest(manifest)
        assert protocol.window == 112 and protocol.stride == 56
