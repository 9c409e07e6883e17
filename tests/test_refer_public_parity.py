"""The default refer pipeline (exported ONNX graphs on ONNX Runtime + clipfuse's numpy
pre-processing) against an independent torch re-implementation of the public Global-Local CLIP
pipeline (tests/glclip_public_reference.py): fused features within 1e-4, the same winning mask for
every text, on weights with perturbed biases and LayerNorm gains, smooth images (one enlarged to
the 800-pixel copy, one shrunk to it) and hard and soft masks. The last test shows the comparison
can fail: each of the pipeline's old shortcuts (no 800 copy, a uint8 224 image, crops from the
original, hard soft-masks) moves the features far beyond the tolerance."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")

import glclip_public_reference as public  # noqa: E402
from clipfuse.runtime.refer import pipeline as P  # noqa: E402

from conftest import TINY  # noqa: E402
from parity_inputs import perturb_  # noqa: E402

TOL = 1e-4
MASKED_BLOCKS = 2            # the tiny ViT has 3 blocks: block 0 runs once, unmasked
ALPHAS = (0.95, 0.85, 0.5)


def _perturbed_state(seed: int = 7, model_name: str = TINY) -> dict:
    """Random weights with every bias and LayerNorm gain moved off open_clip's 0 / 1 init."""
    from clipfuse.export.weights import load_clip

    model = load_clip(model_name, "none", seed=seed).model
    return perturb_(model, seed, bias_std=0.2, gain=(0.7, 1.3)).state_dict()


def _export(folder, model_name: str, masked_blocks: int):
    """export-refer from a perturbed open_clip-format file -> (ReferSegmenter, the torch tower)."""
    from clipfuse.export.refer_export import export_refer
    from clipfuse.export.weights import load_clip

    ckpt = folder / "perturbed.pt"
    torch.save(_perturbed_state(model_name=model_name), ckpt)
    prefix = folder / "refer"
    export_refer(prefix, model=model_name, pretrained=str(ckpt), quick_gelu=False, masked_blocks=masked_blocks,
                 text=False)
    clip = load_clip(model_name, str(ckpt), quick_gelu=False)
    paths = P.graph_paths(prefix)
    return P.ReferSegmenter(paths["global"], paths["local"]), clip.model.visual


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    seg, visual = _export(tmp_path_factory.mktemp("parity"), TINY, MASKED_BLOCKS)
    yield seg, visual
    seg.close()


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour fields plus a few soft blobs (no noise: CLIP needs similar patches)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 6)]
        img[..., c] = 0.5 + 0.35 * np.sin(2 * np.pi * (fx * x / w + fy * y / h) + ph)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.2) * min(h, w)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * (rng.uniform(-0.5, 0.5, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _masks(h: int, w: int, soft: bool) -> np.ndarray:
    """Five proposals; soft ones are the same shapes with feathered borders (interior exactly 1),
    plus one that is nowhere 1 (its crop is all fill, as in the public code)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    shapes = [((0.3, 0.3), (0.2, 0.25)), ((0.65, 0.7), (0.25, 0.2)), ((0.5, 0.5), (0.45, 0.45)),
              ((0.8, 0.2), (0.12, 0.15)), ((0.25, 0.75), (0.15, 0.1))]
    out = []
    for (cy, cx), (ry, rx) in shapes:
        d = np.sqrt(((y - cy * h) / (ry * h)) ** 2 + ((x - cx * w) / (rx * w)) ** 2)
        if soft:
            out.append(np.clip((1.25 - d) / 0.5, 0, 1))       # 1 inside d <= 0.75, ramp to 0 at 1.25
        else:
            out.append((d <= 1).astype(np.float64))
    masks = np.stack(out).astype(np.float32)
    if soft:
        masks[-1] *= 0.6                                      # never 1: the crop keeps nothing
        return masks
    return masks > 0.5


CASES = [((300, 451), False), ((300, 451), True), ((860, 905), False), ((860, 905), True)]


def _check_case(seg, visual, hw, soft, masking_block: int, texts: int = 400) -> float:
    image, masks = _image(*hw, seed=hw[0]), _masks(*hw, soft)
    f_global, f_local = seg.visual_features(image, masks)
    vectors = np.random.default_rng(0).standard_normal((texts, f_global.shape[1])).astype(np.float32)
    ref_g, ref_l = public.public_features(visual, image, masks, masking_block)
    worst = 0.0
    for alpha in ALPHAS:
        ref = public.fuse(ref_g, ref_l, alpha)
        fused = P.combine_features(f_global, f_local, alpha)
        worst = max(worst, float(np.abs(fused - ref.numpy()).max()))
        ours = np.stack([P.cosine_scores(fused, t) for t in vectors], 1)                     # [N, T]
        theirs = public.calculate_score(ref, torch.from_numpy(vectors)).numpy()
        np.testing.assert_array_equal(ours.argmax(0), theirs.argmax(0))
        assert len(set(ours.argmax(0).tolist())) > 1          # the texts do pick different masks
    print(f"{hw} soft={soft}: max |f - f_public| = {worst:.2e} (max |f| {float(ref.abs().max()):.2f})")
    assert worst <= TOL
    np.testing.assert_allclose(f_global, ref_g.numpy(), atol=TOL)
    np.testing.assert_allclose(f_local, ref_l.numpy(), atol=TOL)
    return worst


@pytest.mark.parametrize("hw,soft", CASES, ids=["enlarged-hard", "enlarged-soft", "shrunk-hard", "shrunk-soft"])
def test_fused_features_and_winner_match_public_pipeline(setup, hw, soft):
    seg, visual = setup
    _check_case(seg, visual, hw, soft, masking_block=len(visual.transformer.resblocks) - MASKED_BLOCKS)


def _shortcut_diffs(seg, visual, masking_block: int) -> dict:
    """Max feature difference to the public pipeline of each pre-issue-17 shortcut, one at a time."""
    image, soft = _image(300, 451, seed=300), _masks(300, 451, soft=True)
    prepared = P.prepare_image(image)
    ref_g, ref_l = public.public_features(visual, image, soft, masking_block)
    ref_g, ref_l = ref_g.numpy(), ref_l.numpy()
    direct = P.resize_bilinear_torch(image.astype(np.float32), (224, 224))[None]
    variants = {
        "D1 224 straight from the photo": (P.PreparedImage(direct, prepared.restored), soft, "global"),
        "D2 224 image rounded to uint8": (P.PreparedImage(prepared.global_image.round(), prepared.restored),
                                          soft, "global"),
        "D3 crops from the photo": (P.PreparedImage(prepared.global_image, image.astype(np.float32)), soft, "local"),
        "D4 soft masks made hard (global)": (prepared, (soft > 0).astype(np.float32), "global"),
        "D4 soft masks made hard (local)": (prepared, (soft > 0).astype(np.float32), "local"),
    }
    diffs = {}
    for name, (views, masks, branch) in variants.items():
        if branch == "global":
            diffs[name] = float(np.abs(seg.global_features(views, masks) - ref_g).max())
        else:
            diffs[name] = float(np.abs(seg.local_features(views, masks) - ref_l).max())
        print(f"{name}: {diffs[name]:.2e}")
    return diffs


def test_each_old_shortcut_is_caught(setup):
    """The comparison above can fail: each old shortcut moves the features beyond the tolerance."""
    seg, visual = setup
    for name, diff in _shortcut_diffs(seg, visual, len(visual.transformer.resblocks) - MASKED_BLOCKS).items():
        assert diff > 3 * TOL, f"{name}: {diff:.2e} would pass the parity test"


@pytest.mark.slow
def test_full_size_vitb32_parity(tmp_path):
    """ViT-B/32 (the paper's model), random weights with perturbed biases and gains, masking
    before blocks 9, 10, 11 as the public code (masking_block=9)."""
    seg, visual = _export(tmp_path, "ViT-B-32", 3)
    try:
        for hw, soft in CASES:
            _check_case(seg, visual, hw, soft, masking_block=9)
        for name, diff in _shortcut_diffs(seg, visual, masking_block=9).items():
            assert diff > 3 * TOL, f"{name}: {diff:.2e} would pass the parity test"
    finally:
        seg.close()
