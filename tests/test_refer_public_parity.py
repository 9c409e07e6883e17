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

TOL = 1e-4
MASKED_BLOCKS = 2            # the tiny ViT has 3 blocks: block 0 runs once, unmasked
ALPHAS = (0.95, 0.85, 0.5)


def _perturbed_state(seed: int = 7) -> dict:
    """Random weights with every bias and LayerNorm gain moved off open_clip's 0 / 1 init."""
    from clipfuse.export.weights import load_clip

    model = load_clip(TINY, "none", seed=seed).model
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        value = value.clone()
        if name.endswith("bias"):
            value += 0.2 * torch.randn(value.shape, generator=gen)
        elif ("ln_" in name or "ln_final" in name) and name.endswith("weight"):
            value *= 1.0 + 0.3 * torch.randn(value.shape, generator=gen)
        state[name] = value
    return state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from clipfuse.export.cmd_export_refer import export_refer
    from clipfuse.export.weights import load_clip

    folder = tmp_path_factory.mktemp("parity")
    ckpt = folder / "perturbed.pt"
    torch.save(_perturbed_state(), ckpt)
    prefix = folder / "tiny"
    export_refer(prefix, model=TINY, pretrained=str(ckpt), quick_gelu=False, masked_blocks=MASKED_BLOCKS,
                 text=False)
    clip = load_clip(TINY, str(ckpt), quick_gelu=False)
    paths = P.graph_paths(prefix)
    seg = P.ReferSegmenter(paths["global"], paths["local"])
    yield seg, clip.model.visual
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


@pytest.mark.parametrize("hw,soft", CASES, ids=["enlarged-hard", "enlarged-soft", "shrunk-hard", "shrunk-soft"])
def test_fused_features_and_winner_match_public_pipeline(setup, hw, soft):
    seg, visual = setup
    image, masks = _image(*hw, seed=hw[0]), _masks(*hw, soft)
    f_global, f_local = seg.visual_features(image, masks)
    rng = np.random.default_rng(0)
    texts = rng.standard_normal((400, f_global.shape[1])).astype(np.float32)
    ref_g, ref_l = public.public_features(visual, image, masks, len(visual.transformer.resblocks) - MASKED_BLOCKS)
    for alpha in ALPHAS:
        ref = public.fuse(ref_g, ref_l, alpha)
        fused = P.combine_features(f_global, f_local, alpha)
        print(f"{hw} soft={soft} alpha={alpha}: max |f - f_public| = {np.abs(fused - ref.numpy()).max():.2e}")
        assert np.abs(fused - ref.numpy()).max() <= TOL, np.abs(fused - ref.numpy()).max()
        ours = np.stack([P.cosine_scores(fused, t) for t in texts], 1)                       # [N, T]
        theirs = public.calculate_score(ref, torch.from_numpy(texts)).numpy()
        np.testing.assert_array_equal(ours.argmax(0), theirs.argmax(0))
        assert len(set(ours.argmax(0).tolist())) > 1          # the texts do pick different masks
    np.testing.assert_allclose(f_global, ref_g.numpy(), atol=TOL)
    np.testing.assert_allclose(f_local, ref_l.numpy(), atol=TOL)


def test_each_old_shortcut_is_caught(setup):
    """The comparison above can fail: the pre-issue-17 pre-processing, one shortcut at a time."""
    seg, visual = setup
    image, soft = _image(300, 451, seed=300), _masks(300, 451, soft=True)
    prepared = P.prepare_image(image)
    ref_g, ref_l = public.public_features(visual, image, soft, 1)
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
    for name, (views, masks, branch) in variants.items():
        if branch == "global":
            diff = np.abs(seg.global_features(views, masks) - ref_g).max()
        else:
            diff = np.abs(seg.local_features(views, masks) - ref_l).max()
        print(f"{name}: {diff:.2e}")
        assert diff > 3 * TOL, f"{name}: {diff:.2e} would pass the parity test"
