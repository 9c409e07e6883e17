"""Head families as plugins: every method's family has its module (clipfuse.export.heads), its
typed parameters match the presets, its generated export flags parse, its declared FP32 scopes
exist, and its independent reference shares no code with the fused path."""
from __future__ import annotations

import ast
import importlib
from dataclasses import fields
from pathlib import Path

import pytest

from clipfuse.export.head_args import head_flags, head_overrides
from clipfuse.export.heads import FAMILIES, build_dense_head, family_of
from clipfuse.runtime.cli import build_parser
from clipfuse.runtime.methods import METHODS, params_dict

from conftest import TINY_HEAD_PARAMS

# What an independent reference may import: the tower it observes, numpy, the standard library.
# Nothing of clipfuse.export (the fused path: heads, trunk, attention, fused, api, classifier).
REFERENCE_MAY_IMPORT = ("torch", "numpy", "typing", "math", "__future__", "copy")


@pytest.mark.parametrize("method", list(METHODS))
def test_preset_is_the_family_parameter_dataclass(method):
    spec = METHODS[method]
    family = family_of(method)
    assert type(spec.head_params) is family.params
    assert list(spec.default_head_params()) == [f.name for f in fields(family.params)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_shares_nothing_with_the_fused_path(family):
    module = importlib.import_module(FAMILIES[family].reference)
    tree = ast.parse(Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    bad = {name for name in imported if name.split(".")[0] not in REFERENCE_MAY_IMPORT}
    assert not bad, f"{module.__name__} imports {bad}"
    assert callable(module.scores)


@pytest.mark.parametrize("method", list(METHODS))
def test_family_builds_on_the_tiny_tower_with_its_overrides(tiny_clip, method):
    """tiny_overrides are enough for the 3-block ViT; declared FP32 scopes are real submodules;
    the trunk taps the head asks for lie inside the trunk."""
    visual = tiny_clip.model.visual
    head, _ = build_dense_head(method, visual, (7, 7), dict(TINY_HEAD_PARAMS.get(method, {})),
                               "none" if METHODS[method].takes_heads_checkpoint else None)
    from clipfuse.export.fp16 import DECLARED_FP32_SCOPE
    for scope in family_of(method).fp32_scopes:
        # a real submodule, named so that export/fp16.py keeps its whole scope FP32
        assert isinstance(getattr(head, scope), __import__("torch").nn.Module), scope
        assert scope.startswith(DECLARED_FP32_SCOPE), scope
    taps = head.taps
    tapped = set(taps.output_blocks) | set(taps.attention_blocks) | ({taps.ln2_block} - {None})
    assert all(0 <= b < len(visual.transformer.resblocks) - 1 for b in tapped)


def test_generated_flags_set_exactly_their_parameter():
    """Every flagged field gets its flag, and each flag sets that one parameter."""
    parser = build_parser()
    flagged = {meta["flag"]: name for params in {type(m.head_params) for m in METHODS.values()}
               for name, meta in ((f.name, f.metadata.get("cli")) for f in fields(params)) if meta}
    assert set(head_flags()) == set(flagged)
    values = {"--attn": ("kk", "kk"), "--gaussian-sigma": ("0", None), "--residual": ("off", False),
              "--ffn": ("on", True), "--no-background-rule": (None, False), "--rcs-lambda": ("0.6", 0.6),
              "--rcs-blocks": ("1,2", (1, 2))}
    assert set(values) == set(flagged), "a new flag: add a value here"
    base = ["export", "--head", "sclip", "--classes", "a,b", "-o", "x"]
    assert head_overrides(parser.parse_args(base)) == {}
    for flag, (text, want) in values.items():
        args = parser.parse_args(base + [flag] + ([] if text is None else [text]))
        assert head_overrides(args) == {flagged[flag]: want}, flag


def test_presets_round_trip_through_the_dataclass():
    for method in METHODS.values():
        assert params_dict(family_of(method.name).params(**method.default_head_params())) == \
            method.default_head_params()
