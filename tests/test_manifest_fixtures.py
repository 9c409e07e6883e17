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


# -- typed manifests (clipfuse.runtime.manifest) ---------------------------------------------
from dataclasses import replace  # noqa: E402

from clipfuse.runtime.artifact import contract_sha256, open_artifact  # noqa: E402
from clipfuse.runtime.errors import ClipfuseError  # noqa: E402
from clipfuse.runtime.manifest import (FrameManifest, ImageManifest, ReferManifest, TextManifest,  # noqa: E402
                                       load_manifest, parse_manifest)

TYPES = {"image": ImageManifest, "frame": FrameManifest, "text": TextManifest,
         "refer-global": ReferManifest, "refer-local": ReferManifest}
COMMITTED = [FIXTURES / f"{n}.json" for n in NAMES] + [Path(__file__).parent / "data" / "tiny-naclip" / "naclip.json"]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_committed_manifest_loads_typed_and_round_trips_byte_identically(path):
    text = path.read_text(encoding="utf-8")
    meta = load_manifest(path)
    assert type(meta) is TYPES[meta.kind]
    assert json.dumps(meta.to_dict(), indent=2) + "\n" == text          # what write_manifest writes
    assert contract_sha256(meta.to_dict()) == contract_sha256(json.loads(text))
    raw = json.loads(text)
    assert meta.inputs[0].name == raw["inputs"][0]["name"] and meta.output_name == raw["outputs"][0]["name"]
    assert meta.model == "ViT-T-16-test" and meta.precision == "fp32" and meta.onnx_sha256 == raw["onnx_sha256"]
    if isinstance(meta, ImageManifest):
        assert meta.window == raw["input_size"][0] and meta.head.name == raw["head"]["name"]
        assert [list(c) for c in meta.classes] == raw["classes"] and meta.protocol == raw["protocol"]
        assert meta.dynamic_vocab == (raw["vocab"] == "dynamic")
    if isinstance(meta, FrameManifest):
        assert list(meta.frame_size) == raw["frame_size"] and meta.num_windows == raw["num_windows"]
    if isinstance(meta, TextManifest):
        assert meta.context_length == 77 and meta.tokenizer == raw["tokenizer"]
    if isinstance(meta, ReferManifest):
        assert meta.refer == raw["refer"] and list(meta.grid) == raw["grid"]


def test_unknown_keys_are_kept_in_place():
    raw = json.loads((FIXTURES / "sclip.json").read_text())
    items = list(raw.items())
    future = dict(items[:5] + [("future_field", {"a": [1, 2]})] + items[5:])
    future["head"] = dict(future["head"], later={"x": 1})
    meta = parse_manifest(future)
    assert meta.extra["future_field"] == {"a": [1, 2]} and meta.head.extra["later"] == {"x": 1}
    assert json.dumps(meta.to_dict()) == json.dumps(future)


def test_a_changed_field_is_written_back():
    meta = load_manifest(FIXTURES / "sclip.json")
    out = replace(meta, precision="fp16").to_dict()
    assert out["precision"] == "fp16" and list(out) == list(meta.to_dict())


@pytest.mark.parametrize("field, value, words", [
    ("embed_dim", "64", "'embed_dim' must be an integer"),
    ("input_size", [112, -1], "'input_size' must be a list of positive integers"),
    ("classes", [["sky"], [3]], "'classes' must be a list of lists of class names"),
    ("inputs", [{"name": 1, "dtype": "uint8", "shape": []}], "'inputs[0].name' must be a string"),
    ("head", {"params": {}}, "'head' lacks 'name'"),
    ("engine", {"sha256": 5}, "'engine.sha256' must be a string"),
    ("protocol", [1], "'protocol' must be an object"),
])
def test_a_wrong_type_is_one_line_naming_the_field(tmp_path, field, value, words):
    import shutil
    src = Path(__file__).parent / "data" / "tiny-naclip"
    shutil.copytree(src, tmp_path / "m")
    path = tmp_path / "m" / "naclip.json"
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw, indent=2) + "\n")
    with pytest.raises(ClipfuseError) as err:
        open_artifact(path.with_suffix(".onnx"), verify=False)
    assert words in str(err.value) and "naclip.json" in str(err.value) and "\n" not in str(err.value)


def test_opened_artifact_carries_the_typed_manifest():
    art = open_artifact(Path(__file__).parent / "data" / "tiny-naclip" / "naclip.onnx")
    assert isinstance(art.meta, ImageManifest) and art.meta.to_dict() == art.manifest


# -- export specs round trip through their manifests -----------------------------------------
def test_text_and_refer_specs_from_committed_manifests():
    from clipfuse.export.spec import ReferExportSpec, TextExportSpec

    text = read_manifest(FIXTURES / "refer-text.json")
    spec = TextExportSpec.from_manifest(text)
    assert spec == TextExportSpec(model="ViT-T-16-test", pretrained="none", quick_gelu=False, seed=0, opset=17)
    assert all(text[k] == v for k, v in spec.to_manifest().items())
    for part in ("global", "local"):
        manifest = read_manifest(FIXTURES / f"refer-{part}.json")
        refer = ReferExportSpec.from_manifest(manifest)
        assert refer == ReferExportSpec(model="ViT-T-16-test", pretrained="none", quick_gelu=False)
        assert all(manifest[k] == v for k, v in refer.to_manifest().items())
        assert refer.text_spec() == spec
    with pytest.raises(ClipfuseError, match="does not describe a text graph"):
        TextExportSpec.from_manifest(read_manifest(FIXTURES / "sclip.json"))


def test_text_and_refer_exports_round_trip_their_specs(tmp_path):
    from clipfuse.export.refer_export import export_refer_graphs
    from clipfuse.export.spec import ReferExportSpec, TextExportSpec
    from clipfuse.export.text_graph import export_text

    text = TextExportSpec(model="ViT-T-16-test", pretrained="none", seed=3, precision="fp16")
    path = export_text(text, tmp_path / "t")
    assert TextExportSpec.from_manifest(load_manifest(path.with_suffix(".json"))) == replace(text, quick_gelu=False)
    refer = ReferExportSpec(model="ViT-T-16-test", pretrained="none", seed=3, alpha=0.5, masked_blocks=2,
                            fill="mean", normalization="clip", text=False)
    written = export_refer_graphs(refer, tmp_path / "r")
    assert set(written) == {"global", "local"}
    for path in written.values():
        back = ReferExportSpec.from_manifest(load_manifest(path.with_suffix(".json")))
        assert back == replace(refer, quick_gelu=False, text=True)
