"""Graphs exported by today's code are node-for-node those of the code before the head-family
refactor (tests/data/graph_fingerprints.json, written by tests/graph_identity.py), for every head
of the registry, a dynamic-vocabulary graph, a frame graph, the text and the refer graphs."""
from __future__ import annotations

import json

import pytest
from graph_identity import FINGERPRINTS, fingerprints

from clipfuse.runtime.methods import METHODS


@pytest.mark.slow
def test_graphs_unchanged(tmp_path):
    before = json.loads(FINGERPRINTS.read_text())
    assert set(METHODS) <= set(before), "a new head: add its fingerprint (python tests/graph_identity.py --write)"
    after = fingerprints(tmp_path)
    changed = sorted(name for name in before if after.get(name) != before[name])
    assert not changed, f"graphs changed: {changed}"
