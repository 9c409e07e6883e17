"""Graphs exported by today's code are node-for-node those of the code before the head-family
refactor (tests/data/graph_fingerprints.json, written by tests/graph_identity.py), for every head
of the registry, a dynamic-vocabulary graph, a frame graph, the text and the refer graphs."""
from __future__ import annotations

import json

import pytest
from graph_identity import FINGERPRINTS, differences, fingerprints

from clipfuse.runtime.methods import METHODS


@pytest.mark.slow
def test_graphs_unchanged(tmp_path):
    before = json.loads(FINGERPRINTS.read_text())
    assert set(METHODS) <= set(before), "a new head: add its fingerprint (python tests/graph_identity.py --write)"
    after = fingerprints(tmp_path)
    changed = {name: differences(before[name], after[name]) if name in after else ["missing"] for name in before}
    changed = {name: what for name, what in changed.items() if what}
    assert not changed, f"graphs changed: {changed}"
    # and each graph's contract (what its outputs mean: classes, protocol, head, I/O) is the one
    # the manifests committed in tests/data/manifests carry
    from pathlib import Path

    from clipfuse.runtime.artifact import contract_of
    from clipfuse.runtime.manifest import read_manifest
    for fixture in sorted((Path(__file__).parent / "data" / "manifests").glob("*.json")):
        want, got = (contract_of(read_manifest(p)) for p in (fixture, tmp_path / fixture.name))
        assert got == want, f"{fixture.stem}: contract changed"
