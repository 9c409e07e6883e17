"""SC-CLIP (docs/methods.md#sc-clip): the static head against the reference written from
the spec (export/reference.py: torch.quantile, torch.where, Python index lists, one window at a
time), on the perturbed tiny ViT with smooth images; plus the static replacements on their own.

The tiny ViT has 3 blocks, so SC-CLIP's ViT-B/16 block indices are overridden: LOF on F_1
(the last block's input), S8 from F_1, S3 from F_0, multi-level sum F_0 + F_1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipfuse.export.api import build_fused, export_image_graph
from clipfuse.export.heads.scclip import ScClipHead, outlier_count
from clipfuse.export.heads.scclip_reference import _scclip_fix, _scclip_lof_outliers
from clipfuse.export.reference import ReferenceModel

from conftest import TINY_HEAD_PARAMS, VOCAB
from parity_inputs import match_reference, smooth_images

TOL = 1e-4
TINY_BLOCKS = TINY_HEAD_PARAMS["sc-clip"]


@pytest.fixture(scope="module")
def scclip_build(perturbed_tiny):
    spec = perturbed_tiny.spec("sc-clip", classes=VOCAB, size=224, templates="single", head_params=TINY_BLOCKS)
    return spec, build_fused(spec, clip=perturbed_tiny.clip)


def test_outlier_count_matches_torch_quantile():
    for n in (196, 588, 1200, 50):
        k_out, _ = outlier_count(n, 0.95)
        vals = torch.randperm(n).float()
        assert int((vals > torch.quantile(vals, 0.95)).sum()) == k_out
    assert outlier_count(196, 0.95)[0] == 10


def test_static_lof_and_fix_equal_public_formulation(scclip_build):
    """TopK + lerp threshold and the depthwise 3x3 fix against quantile/where/index lists."""
    head = scclip_build[1].module.head.fp32_statistics
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        p = torch.randn(196, 128, generator=gen, dtype=torch.float64).float() * (1 + trial)
        mask = head.outlier_mask(p.unsqueeze(0))[0]
        ids = _scclip_lof_outliers(p, 30, 0.95)
        want = torch.zeros(196)
        want[ids] = 1
        assert torch.equal(mask, want)
        fixed = head.fix(p.unsqueeze(0), mask.unsqueeze(0))[0]
        ref = _scclip_fix(p.reshape(14, 14, -1), ids, 14).reshape(196, -1)
        assert torch.allclose(fixed, ref, atol=1e-6)


def test_threshold_exact_with_ties(scclip_build):
    """Tied LOF values across ranks 185/186 (reference then selects fewer than 10)."""
    head = scclip_build[1].module.head.fp32_statistics
    gen = torch.Generator().manual_seed(1)
    for lo, hi in ((186, 187), (185, 187), (184, 187), (185, 190), (180, 196), (186, 188)):
        lof = torch.rand(196, generator=gen) + 1.0
        order = lof.argsort()
        lof[order[lo:hi]] = float(lof[order[lo]])     # a run of equal values at the threshold
        want = lof > torch.quantile(lof, 0.95)
        assert torch.equal(head.select_outliers(lof.unsqueeze(0))[0], want)


def test_fused_and_onnx_match_reference(tmp_path, perturbed_tiny, scclip_build):
    spec, build = scclip_build
    onnx_path = export_image_graph(spec, tmp_path / "sc", clip=perturbed_tiny.clip)
    expected, _ = match_reference(build, onnx_path, smooth_images(3, 224, seed=7), TOL)
    assert np.isfinite(expected).all() and len(np.unique(expected.argmax(axis=1))) > 1


def test_outlier_masks_agree_with_reference(scclip_build):
    """Reported apart from the logits: the selection is discontinuous."""
    build = scclip_build[1]
    ref = ReferenceModel.from_build(build)
    images = smooth_images(4, 224, seed=11)
    head: ScClipHead = build.module.head
    agree = []
    for img in images:
        ref(img[None])
        want = torch.zeros(196)
        want[ref.last_outliers] = 1
        with torch.no_grad():
            x = build.module.trunk(torch.from_numpy(img[None])).tokens
            got = head.fp32_statistics.outlier_mask(x[:, 1:])[0]
        agree.append(float((got == want).float().mean()))
        assert int(got.sum()) == 10
    assert min(agree) == 1.0, agree


@pytest.fixture(scope="module")
def scclip_onnx(tmp_path_factory, perturbed_tiny, scclip_build):
    return export_image_graph(scclip_build[0], tmp_path_factory.mktemp("sc_onnx") / "sc",
                              clip=perturbed_tiny.clip)


def test_fp16_graph_keeps_statistics_fp32_and_labels_agree(tmp_path, scclip_onnx):
    """Declared islands (LOF, TopK, cosine matrices, thresholds) are FP32; labels agree >= 99 %."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    from clipfuse.export import fp16 as fp16_pass
    from clipfuse.export import graph_checks

    dst = tmp_path / "sc.fp16.onnx"
    report = fp16_pass.convert_file(scclip_onnx, dst)
    assert report.fp32_by_reason.get("declared", 0) > 50
    model = onnx.load(str(dst))
    assert graph_checks.run_checks(model) == []
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    for node in model.graph.node:
        if node.op_type in ("TopK", "GatherElements", "GreaterOrEqual", "Greater"):
            assert types.get(node.input[0]) == TensorProto.FLOAT, node.name
    images = smooth_images(6, 224, seed=21)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["scores"],
                                                                                     {"image": images})[0]
    s32, s16 = run(scclip_onnx), run(dst)
    agree = float((s32.argmax(1) == s16.argmax(1)).mean())
    print(f"sc-clip tiny FP16 vs FP32: label agreement {agree:.4f}, max |diff| {np.abs(s32 - s16).max():.2e}")
    assert agree >= 0.99, agree


def test_analytic_flops_match_torch_flop_counter(scclip_build):
    """benchmarks.flops counts every matmul/conv the fused SC-CLIP module runs (two attention passes)."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipfuse.benchmarks.flops import VitShape, head_flops

    spec, build = scclip_build
    shape = VitShape.from_visual(build.clip.model.visual)
    image = torch.from_numpy(smooth_images(2, 224, seed=3))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build.module(image)
    names = sum(len(c) for c in VOCAB)
    assert counter.get_total_flops() // 2 == head_flops("sc-clip", shape, 224, names, build.head_params,
                                                        as_exported=True)["total"]


def test_frame_graph_equals_windowed_runtime(tmp_path, perturbed_tiny, scclip_build, scclip_onnx):
    """The frame graph batches every window through the head: SC-CLIP's LOF, means and masks are
    per window, so it must equal the runtime's window-by-window protocol."""
    from dataclasses import replace

    from test_frame_graph import CONF_ATOL, LABELS_MIN, _compare
    from test_runtime_parity import synthetic_photo

    frm = export_image_graph(replace(scclip_build[0], frame=(240, 320)), tmp_path / "frame", clip=perturbed_tiny.clip)
    agree, conf, score, labels = _compare(scclip_onnx, frm, synthetic_photo(240, 320, seed=4))
    assert len(np.unique(labels)) >= 2
    assert agree >= LABELS_MIN and conf <= CONF_ATOL and score <= CONF_ATOL, (agree, conf, score)


def test_eval_protocol_per_dataset_is_the_spec_table():
    """docs/methods.md#the-sliding-window-protocol (sc-clip row): what `eval` applies through
    MethodSpec.protocol_for."""
    from clipfuse.runtime.methods import get_method

    m = get_method("sc-clip")
    want = {"voc21": (336, 50.0, 0.15, 0.1), "context60": (336, 40.0, 0.15, None),
            "coco-object": (336, 55.0, 0.35, None), "voc20": (336, 40.0, 0.0, None),
            "context59": (336, 40.0, 0.0, None), "coco-stuff164k": (336, 40.0, 0.0, None),
            "cityscapes": (560, 40.0, 0.0, None), "ade20k": (336, 40.0, 0.0, None)}
    for dataset, (short, scale, prob, area) in want.items():
        p = m.protocol_for(dataset)
        assert (p.short_side, p.logit_scale, p.prob_thd, p.area_thd) == (short, scale, prob, area), dataset
        assert (p.window, p.stride, p.long_side_max, p.score_type) == (224, 112, 2048, "cosine")
    assert m.default_pretrained == "openai" and m.class_names == "sclip"
