"""Heads on other towers: the per-backbone table (runtime/backbones.py) and parity of every head's
fused graph with the independent reference on a perturbed tiny PATCH-14 tower (ViT-L/14's and
ViT-H/14's patch: a 16x16 grid at window 224, not ViT-B/16's 14x14)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipfuse.export.api import build_fused, export_image_graph
from clipfuse.runtime.backbones import BACKBONES, backbone_of, head_params_for, protocol_for, setting
from clipfuse.runtime.manifest import read_manifest
from clipfuse.runtime.methods import METHODS

from conftest import PerturbedWeights, TINY_HEAD_PARAMS, VOCAB
from parity_inputs import match_reference, smooth_images

TINY14 = "ViT-T-14-test"
TOL = 1e-4


@pytest.fixture(scope="module")
def perturbed_tiny14(tmp_path_factory):
    return PerturbedWeights(tmp_path_factory.mktemp("perturbed_tiny14"), model_name=TINY14)


@pytest.mark.parametrize("head", sorted(METHODS))
def test_tiny_patch14_fused_and_onnx_match_reference(tmp_path, perturbed_tiny14, head):
    spec = perturbed_tiny14.spec(head, classes=VOCAB, size=224, templates="single",
                                 head_params=TINY_HEAD_PARAMS.get(head, {}))
    build = build_fused(spec, clip=perturbed_tiny14.clip)
    assert build.grid == (16, 16)
    onnx_path = export_image_graph(spec, tmp_path / head, clip=perturbed_tiny14.clip)
    expected, got = match_reference(build, onnx_path, smooth_images(2, 224, seed=14), TOL)
    assert got.shape == (2, len(VOCAB), 16, 16)
    assert float(expected.std(axis=1).mean()) > 1e-4 and float(expected.std(axis=(2, 3)).mean()) > 1e-5
    manifest = read_manifest(onnx_path.with_suffix(".json"))
    assert manifest["patch_size"] == 14 and manifest["grid"] == [16, 16]


def test_patch14_graph_at_336_has_a_24x24_grid(tmp_path, perturbed_tiny14):
    spec = perturbed_tiny14.spec("naclip", classes=VOCAB, size=336, templates="single")
    build = build_fused(spec, clip=perturbed_tiny14.clip)
    onnx_path = export_image_graph(spec, tmp_path / "n336", clip=perturbed_tiny14.clip)
    _, got = match_reference(build, onnx_path, smooth_images(1, 336, seed=3), TOL)
    assert got.shape == (1, len(VOCAB), 24, 24)
    protocol = read_manifest(onnx_path.with_suffix(".json"))["protocol"]
    assert protocol["window"] == 336 and protocol["stride"] == 168


@pytest.mark.parametrize("model", sorted(BACKBONES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_head_has_a_setting_on_every_backbone(method, model):
    backbone = backbone_of(model)
    protocol = protocol_for(method, model)
    assert protocol.window % backbone.patch == 0 and protocol.stride > 0
    s = setting(method, model)
    assert s.note and isinstance(s.published, bool)
    params = head_params_for(method, model)
    for key in ("pre_adjust_block", "post_adjust_block", "multi_start"):
        if key in params:
            assert 0 <= params[key] < backbone.layers
    if "multi_stop" in params:
        assert params["multi_start"] < params["multi_stop"] <= backbone.layers
    if "attention_blocks" in params:
        assert all(0 <= b < backbone.layers for b in params["attention_blocks"])


def test_reference_backbone_is_the_methods_own_setting():
    for name, spec in METHODS.items():
        assert protocol_for(name, "ViT-B-16") == spec.protocol == spec.protocol_on("ViT-B-16")
        assert head_params_for(name, "ViT-B-16") == spec.default_head_params()
        assert setting(name, "ViT-B-16").published
        # the tiny test towers are not in the table: the ViT-B/16 setting
        assert spec.protocol_on("ViT-T-14-test", 336) == spec.protocol_at(336)


def test_deeper_towers_read_blocks_at_the_same_relative_depth():
    assert head_params_for("rcs", "ViT-L-14")["attention_blocks"] == tuple(range(10, 18))
    assert head_params_for("rcs", "ViT-H-14")["attention_blocks"] == tuple(range(13, 24))
    sc = head_params_for("sc-clip", "ViT-L-14")
    assert (sc["pre_adjust_block"], sc["post_adjust_block"], sc["multi_start"], sc["multi_stop"]) == (16, 6, 6, 20)
    assert not setting("rcs", "ViT-L-14").published
    assert "same relative depth" in setting("rcs", "ViT-L-14").note


def test_clipfuse_heads_states_published_or_default_per_backbone(capsys):
    from clipfuse.runtime.cli import main

    assert main(["heads", "--json"]) == 0
    rows = {r["head"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows["naclip"]["backbones"]) == set(BACKBONES)
    vitl = rows["naclip"]["backbones"]["ViT-L-14"]
    assert vitl["grid"] == 16 and not vitl["published"] and "stated default" in vitl["note"]
    assert rows["clearclip"]["backbones"]["ViT-L-14"]["published"]
    assert rows["maskclip"]["backbones"]["ViT-B-32"]["grid"] == 14      # 448 / 32
    assert main(["heads"]) == 0
    text = capsys.readouterr().out
    assert "ViT-H-14: window 224 (16x16 grid), stated default" in text


def test_export_spec_picks_the_backbone_defaults():
    from clipfuse.export.api import _dense_head_params
    from clipfuse.export.spec import ImageExportSpec

    spec = ImageExportSpec("rcs", model="ViT-L-14", classes=[["a"], ["b"]])
    assert spec.resolved().size == 224
    assert _dense_head_params(spec, [["a"], ["b"]])["attention_blocks"] == tuple(range(10, 18))
    user = ImageExportSpec("rcs", model="ViT-L-14", classes=[["a"]], head_params={"attention_blocks": (1, 2)})
    assert _dense_head_params(user, [["a"]])["attention_blocks"] == (1, 2)
    assert np.isfinite(protocol_for("rcs", "ViT-L-14").logit_scale)


def test_analytic_flops_match_torch_counter_on_the_patch14_tower(tiny_clip):
    """bench's analytic count (benchmarks/flops.py) on a patch-14 tower equals what
    torch.utils.flop_counter counts on the fused module (2 FLOPs per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipfuse.benchmarks.flops import VitShape, head_flops
    from clipfuse.export.spec import ImageExportSpec
    from clipfuse.export.weights import load_clip

    clip = load_clip(TINY14, "none", seed=0)
    shape = VitShape.from_visual(clip.model.visual)
    assert shape == VitShape.from_config(TINY14) and shape.patch == 14
    for head in sorted(METHODS):
        build = build_fused(ImageExportSpec(head, model=TINY14, pretrained="none", classes=VOCAB[:3], size=112,
                                            templates="single", head_params=TINY_HEAD_PARAMS.get(head, {})),
                            clip=clip)
        image = torch.randint(0, 256, (1, 112, 112, 3), dtype=torch.uint8)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            build.module(image)
        names = sum(len(c) for c in VOCAB[:3])
        assert counter.get_total_flops() == head_flops(head, shape, 112, names, build.head_params,
                                                            as_exported=True)["total"], head


@pytest.mark.parametrize("model,patch,layers,width", [("ViT-B-32", 32, 12, 768), ("ViT-L-14", 14, 24, 1024),
                                                      ("ViT-L-14-336", 14, 24, 1024), ("ViT-H-14", 14, 32, 1280)])
def test_bench_knows_the_big_towers(model, patch, layers, width):
    from clipfuse.benchmarks.flops import VitShape, head_flops

    shape = VitShape.from_config(model)
    assert (shape.patch, shape.layers, shape.width) == (patch, layers, width)
    assert (BACKBONES[model].patch, BACKBONES[model].layers, BACKBONES[model].width) == (patch, layers, width)
    total = head_flops("naclip", shape, protocol_for("naclip", model).window, 21)["total"]
    t = (224 // patch) ** 2 + 1
    # the unchanged blocks dominate: 24 T D^2 + 4 T^2 D each (qkv, out, MLP of width 4D)
    blocks = (layers - 1) * (24 * t * width ** 2 + 4 * t * t * width)
    assert blocks < total < 1.15 * blocks
